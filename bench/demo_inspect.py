"""Why a demo score is what it is: sample one checkpoint on some prompts the way the demo does (same seeds, sampler
and guidance) and print, per prompt, what the judge saw: subject count, backgrounds, shapes, and each picture's
verdict with its three commonest colours; optionally a grid PNG per prompt.

    python bench/demo_inspect.py CHECKPOINT --seed N [--prompt P ...] [--grids DIR] [--tokenizer DIR]

Default prompts: the demo's instance, new-context and class prompts.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    """Sample, judge and print."""
    import tempfile

    import numpy as np
    from PIL import Image

    from dreambooth.demo import run as demo
    from dreambooth.demo.evaluate import judge_batch
    from dreambooth.models.load import load_model

    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the demo run's seed (samples use seed + 100000)")
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--grids", type=Path, help="write one 8-wide grid PNG per prompt here")
    parser.add_argument("--tokenizer", default="")
    a = parser.parse_args()
    prompts = a.prompt or [demo.INSTANCE_PROMPT, demo.CONTEXT_PROMPT, demo.CLASS_PROMPT]
    work = Path(tempfile.mkdtemp(prefix="demo-inspect-"))
    components = load_model(a.checkpoint, cache_dir=work / "cache", tokenizer_dir=a.tokenizer,
                            config_dir=str(demo.DEMO_CONFIG_DIR)).components
    options = demo.settings(quick=False)
    for prompt in prompts:
        images = demo._sample(components, prompt, options, a.seed + 100_000)
        verdicts = judge_batch(images)
        print(f"{prompt!r}: subject {sum(v.is_subject for v in verdicts)}/{len(verdicts)}; "
              f"backgrounds {Counter(v.background for v in verdicts).most_common()}; "
              f"shapes {Counter(v.shape for v in verdicts).most_common()}")
        for i, v in enumerate(verdicts):
            colours = ", ".join(f"{name} {share:.2f}" for name, share in
                                sorted(v.colour_shares.items(), key=lambda item: -item[1])[:3])
            print(f"  {i:2d} {'subject' if v.is_subject else '-------'} {v.shape:8s} on {v.background:7s} {colours}")
        if a.grids:
            a.grids.mkdir(parents=True, exist_ok=True)
            rows = [np.concatenate(list(images[i:i + 8]), axis=1) for i in range(0, len(images) - 7, 8)]
            grid = Image.fromarray(np.concatenate(rows, axis=0))
            grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(
                a.grids / (prompt.replace(" ", "_") + ".png"))


if __name__ == "__main__":
    main()
