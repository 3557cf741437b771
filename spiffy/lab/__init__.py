"""The lab: the experiment runner (config schema, pipeline, results, tracking, reports, benchmarks, sweeps) over the library."""
