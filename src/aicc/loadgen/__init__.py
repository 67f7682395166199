"""Load generator for OpenAI-compatible servers (`aicc bench`), in the manner of vLLM's
`bench serve`: datasets make prompts, the runner streams them at a fixed concurrency or a
Poisson rate, stats summarises the timings, report prints and writes them."""
