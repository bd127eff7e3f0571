"""`tandem plan` and `auto`: a cost model that predicts each strategy's speed-up on a mesh of devices, from one-device
measurements, the bytes each strategy moves and the link's figures, and chooses (never slower than one device).

Pure parts (tested on made-up inputs): links.py (named link profiles and their sources), traffic.py (bytes per
call), costs.py (per strategy: compute share and exposed communication), model.py (candidates), choose.py.
measure.py takes a bench model's one-device inputs on the spot; probe.py measures a pool's link and contention
on its workers; report.py prints them; calibrate.py (host) and timing.py
(worker) take a real call's inputs on the pool for `auto`, which runs the choice; bench_check.py puts the prediction beside each `tandem bench` row.
paper.py counts full-size models' inputs for named GPUs instead (FLOPs on the meta device, published
throughput), from the models paper_models.py builds there, under the constants fitted.py holds (published.py fits
them to peers' published GPU speed-ups, tests/data/published_gpu_figures.csv), or under a card's own figures that
gpu_calibration.py measures (`tandem plan --calibrate`); paper_doc.py writes them to docs/gpu-predictions.md.
Predictions are a model's, labelled as such: not measurements.
"""
