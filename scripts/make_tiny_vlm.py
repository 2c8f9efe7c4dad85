"""Write the tiny vision-language models and the image preference data of configs/vision-tiny.yaml.

    .venv/bin/python scripts/make_tiny_vlm.py [--out .dpo/vision-tiny] [--force]

Offline and seeded: randomly initialised tiny VLMs built as the tests build them (tests/tiny_vlm.py:
a LLaVA and an Idefics3, each a safetensors folder with its processor: image processor, character
tokenizer, chat template), and "What color is the square?" preference pairs, one generated PNG each
(chosen names the square's color, rejected another one), as train.jsonl / eval.jsonl with relative
image paths. Existing outputs are kept unless --force.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_vlm import ARCHS, color_rows, tiny_vlm_dir, write_jsonl  # noqa: E402


def make(out: Path, train: int = 256, eval_: int = 64, force: bool = False, hidden: int = 64) -> dict[str, Path]:
    """The model folders and data files under ``out`` (written unless present)."""
    out = Path(out)
    made = {arch: out / arch for arch in ARCHS}
    for arch, folder in made.items():
        if force or not (folder / "model.safetensors").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            tiny_vlm_dir(folder, arch, hidden=hidden)
    data = out / "data"
    for split, n, seed in (("train", train, 0), ("eval", eval_, 1)):
        path = data / f"{split}.jsonl"
        if force or not path.is_file():
            write_jsonl(path, color_rows(data, n, seed=seed))
        made[split] = path
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".dpo" / "vision-tiny")
    ap.add_argument("--train", type=int, default=256, help="train pairs")
    ap.add_argument("--eval", type=int, default=64, help="held-out pairs")
    ap.add_argument("--hidden", type=int, default=64, help="language model width")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    for name, path in make(args.out, args.train, args.eval, args.force, args.hidden).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
