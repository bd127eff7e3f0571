"""`tandem demo`: a local Gradio app (Generate, Benchmark, Pool). Needs gradio; the engine never imports this."""
