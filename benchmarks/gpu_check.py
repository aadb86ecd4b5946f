"""Peak memory and step time of the real-model configs on a GPU, with random weights of the real shape.

    python benchmarks/gpu_check.py --out results/gpu_check.json
    python benchmarks/gpu_check.py --smoke     # tiny shapes on the CPU: checks the script itself

For each config it writes a model folder with Qwen2.5's real dimensions and random weights (no
hub needed), then runs ``fit`` for a few steps through the same CLI with the config's own
policy, sampling and loss settings. A random model almost never samples EOS, so every response
runs to ``max_new_tokens``: the worst case for memory. Prompts come from the procedural task,
padded to ``--prompt-chars`` characters (one token each with the character tokenizer).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from transformers import Qwen2Config, Qwen2ForCausalLM

from lightning_flow.cli import main as cli_main
from lightning_flow.tiny import build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Dimensions from the published Qwen2.5 config.json files.
SHAPES = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
}
CONFIGS = {
    "qwen2.5-0.5b": "configs/qwen2.5-0.5b-lora-gsm8k.yaml",
    "qwen2.5-1.5b": "configs/qwen2.5-1.5b-qlora-gsm8k.yaml",
}


SMOKE_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def peak_memory_bytes() -> int:
    """Peak CUDA memory allocated by tensors, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProbe(Callback):
    """Records wall time and peak memory of each training step."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.peak_bytes = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.step_times.append(time.perf_counter() - self._start)
        self.peak_bytes = max(self.peak_bytes, peak_memory_bytes())


def random_model_folder(dims: dict, folder: Path) -> None:
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        **dims,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check(shape: str, steps: int, prompt_chars: int, workdir: Path, smoke: bool) -> dict:
    folder = workdir / shape
    random_model_folder(SMOKE_SHAPE if smoke else SHAPES[shape], folder)
    probe = StepProbe()
    smoke_overrides = [
        "--trainer.accelerator=cpu",
        "--model.sampling.max_new_tokens=16",
        "--model.grpo.micro_batch_size=2",
    ]
    cli = cli_main(
        [
            "--config",
            str(REPO / CONFIGS[shape]),
            f"--model.policy.name_or_path={folder}",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={workdir}",
            f"--trainer.logger.init_args.save_dir={workdir / 'runs'}",
            "--data=lightning_flow.datamodules.ArithmeticDataModule",
            f"--data.instruction={'Think step by step. ' * (prompt_chars // 20)}",
            f"--data.max_prompt_length={prompt_chars + 64}",
            *(smoke_overrides if smoke else []),
        ],
        run=False,
    )
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    sampling = cli.model.sampling
    timed = probe.step_times[1:] or probe.step_times  # the first step pays for CUDA warm-up
    return {
        "config": CONFIGS[shape],
        "responses_per_step": cli.datamodule.batch_size * sampling.num_generations,
        "max_new_tokens": sampling.max_new_tokens,
        "peak_memory_gib": round(probe.peak_bytes / 2**30, 2),
        "step_time_s_median": round(statistics.median(timed), 2),
        "step_times_s": [round(t, 2) for t in probe.step_times],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="training steps per model; the first is warm-up")
    parser.add_argument("--prompt-chars", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny dimensions on the CPU, to check the script without a GPU"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("gpu_check.py needs a CUDA GPU (or --smoke)")
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else "cpu (smoke: tiny dimensions, peak RSS)"
    )
    results = {"device": device, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.models:
            results["results"][shape] = check(shape, args.steps, args.prompt_chars, Path(tmp), args.smoke)
            print(json.dumps({shape: results["results"][shape]}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
