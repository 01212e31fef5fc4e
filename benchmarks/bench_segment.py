"""Benchmark: the exported ensemble on the CPU, ONNX Runtime against PyTorch, in images per second and peak memory.

The model is the default run's: params.yaml's network (`train.*`), `--folds` folds (4 in the default
run) and the horizontal-flip views (`predict.tta_flip`), i.e. 8 forward passes per image, at the
working size the plan gives on a CPU at 420x580 (96x128; `--height`/`--width`). Weights are random
(throughput and memory do not depend on their values). The same graph runs in both: PyTorch runs
`pipeline.stages.export.FlipEnsemble` under `inference_mode` (what predict runs on a CPU), ONNX
Runtime runs the `model.onnx` the export stage writes from it. Each (runtime, batch) is measured in
a fresh process, so its peak resident memory (VmHWM: libraries, weights and activations) is
its own; the ONNX Runtime process never imports torch, as `pipeline segment` does not.
Both get the same thread count (`--threads`, default: all cores) and the same seeded input; ONNX
Runtime gets `segment`'s session options.

    python benchmarks/bench_segment.py [--params params.yaml] [--folds 4] [--threads N] [--seconds 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 32)


def _input(batch: int, channels: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(batch).random((batch, channels, *size), dtype=np.float32)


def _time(run, batch: int, seconds: float) -> tuple[float, int]:
    """Images per second: one warm-up call, then calls until `seconds` have passed (at least two)."""
    run()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        run()
        calls += 1
    return calls * batch / (time.perf_counter() - start), calls


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM: since its exec, unlike ru_maxrss, which Linux carries over
    from the parent that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: ru_maxrss, in KiB there too


def worker(kind: str, folder: Path, batch: int, threads: int, seconds: float) -> dict:
    """Runs in its own process: load one runtime, time it, report rate and peak memory as JSON."""
    meta = json.loads((folder / "bench.json").read_text())
    x = _input(batch, meta["channels"], tuple(meta["size"]))
    if kind == "onnxruntime":
        import onnxruntime as ort

        from pipeline.deploy.segment import session_options

        session = ort.InferenceSession(str(folder / "model.onnx"), session_options(threads),
                                       providers=["CPUExecutionProvider"])
        run = lambda: session.run(None, {"image": x})  # noqa: E731
        version = ort.__version__
        out = run()[0]
    else:
        import torch

        torch.set_num_threads(threads)
        module = torch.load(folder / "module.pt", weights_only=False).eval()
        tensor = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return module(tensor)
        version = torch.__version__
        out = run()[0].numpy()
    rate, calls = _time(run, batch, seconds)
    np.save(folder / f"{kind}_{batch}.npy", out[:1])
    peak = _peak_mib()
    return {"rate": rate, "calls": calls, "peak_mib": peak, "version": version}


def build(folder: Path, params_file: str, folds: int, size: tuple[int, int]) -> dict:
    """The default run's ensemble with random weights: saved for PyTorch, exported to ONNX as the stage does."""
    import torch

    from pipeline.params import load_params
    from pipeline.model.network import build_model
    from pipeline.stages import export

    params = load_params(params_file)
    t = params.train
    channels = 1 if params.data.channels == "gray" else 3
    torch.manual_seed(0)
    models = [build_model(t, channels).eval() for _ in range(folds)]
    norms = [{"mean": 0.4, "std": 0.2}] * folds
    module = export.FlipEnsemble(models, norms, params.predict.tta_flip).eval()
    torch.save(module, folder / "module.pt")
    started = time.perf_counter()
    export._export(module, torch.rand(1, channels, *size), folder / "model.onnx")
    meta = {"channels": channels, "size": list(size), "folds": folds, "views": folds * len(module.flips),
            "encoder": t.encoder, "decoder_channels": list(t.decoder_channels),
            "parameters": sum(p.numel() for p in module.parameters()), "export_seconds": time.perf_counter() - started}
    (folder / "bench.json").write_text(json.dumps(meta))
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per (runtime, batch), after warm-up")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "FOLDER", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, folder, batch = args.worker
        print(json.dumps(worker(kind, Path(folder), int(batch), args.threads, args.seconds)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_segment.") as tmp:
        folder = Path(tmp)
        meta = build(folder, args.params, args.folds, (args.height, args.width))
        load = os.getloadavg()[0]
        results = {}
        for batch in BATCHES:
            for kind in ("torch", "onnxruntime"):
                command = [sys.executable, __file__, "--worker", kind, str(folder), str(batch),
                           "--threads", str(args.threads), "--seconds", str(args.seconds)]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                results[kind, batch] = json.loads(done.stdout.strip().splitlines()[-1])
        diff = max(float(np.abs(np.load(folder / f"onnxruntime_{b}.npy") - np.load(folder / f"torch_{b}.npy")).max())
                   for b in BATCHES)
        load_end = os.getloadavg()[0]

    print(f"{meta['encoder']} U-Net, decoder {meta['decoder_channels']}, {meta['folds']} folds x "
          f"{meta['views'] // meta['folds']} views = {meta['views']} forward passes per image, "
          f"{meta['parameters'] / 1e6:.1f} M parameters, input {meta['channels']}x{args.height}x{args.width}; "
          f"{args.threads} thread(s) each; torch {results['torch', 1]['version']}, "
          f"onnxruntime {results['onnxruntime', 1]['version']}; export {meta['export_seconds']:.1f} s")
    print(f"load average {load:.2f} at the start, {load_end:.2f} at the end; largest |ORT - PyTorch| "
          f"mask probability {diff:.1e}")
    print()
    print("| batch | PyTorch images/s | ONNX Runtime images/s | ORT / PyTorch | PyTorch peak RSS | ONNX Runtime peak RSS |")
    print("|---|---|---|---|---|---|")
    for batch in BATCHES:
        pt, ox = results["torch", batch], results["onnxruntime", batch]
        print(f"| {batch} | {pt['rate']:.2f} | {ox['rate']:.2f} | {ox['rate'] / pt['rate']:.2f}x | "
              f"{pt['peak_mib']:.0f} MiB | {ox['peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
