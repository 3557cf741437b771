"""Tasks: the offline `arith` word-problem generator, GSM8K-style answer scoring, the char tokenizer."""
