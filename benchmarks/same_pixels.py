"""Does another version of the pack fuse the same pixels? FaceFusion of both trees on the shared photos, compared.

    git archive OLD_COMMIT | tar -x -C old_tree
    python benchmarks/same_pixels.py --old old_tree

Cases: a template into photos of the same person and of others, with and without the person's reference
photos, each in threads only and with two helper processes. Each tree runs in a process of its own and writes
every fused image, mask and report line; then they are compared. Prints one JSON line: how many outputs, and
the ones that differ. (Compare on the CPU, where a speed change must not change a pixel; on a GPU the nets'
rounding follows the kernels cuDNN picks, which a change of batch or shape may alter. One tree against itself
on a GPU checks that its runs agree.) Set ``FACECHAIN_EMBEDDED_DIR`` when the old tree has no
``models/embedded`` of its own (a ``git archive`` has none).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_paths import REPO, SHARED_FACES  # noqa: E402  (puts the checkout on sys.path)

CASES = [  # template, images, reference photos (all under the shared faces folder)
    ("obama/obama1.jpg", ["obama/obama2.jpg", "obama/obama3.jpg", "biden/biden1.jpg", "biden/biden2.jpg",
                          "rose_leslie/rose1.jpg"], []),
    ("rose_leslie/rose1.jpg", ["rose_leslie/rose2.jpg", "katy_perry/img26.jpg"], ["rose_leslie/rose2.jpg"]),
    ("katy_perry/img42.jpg", ["katy_perry/img26.jpg", "katy_perry/img44.jpg", "obama/obama2.jpg"],
     ["katy_perry/img26.jpg", "katy_perry/img44.jpg"]),
]

# run inside each tree: fuse every case, save the outputs (argv: tree, faces folder, output file)
_CHILD = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from facechain_core import fusion
from facechain_core.images import load_photo
faces, out, cases = sys.argv[2], sys.argv[3], {cases!r}
saved = {{}}
for k, (tpl, imgs, refs) in enumerate(cases):
    for procs in (0, 2):
        result = fusion.fuse_images([load_photo(f"{{faces}}/{{p}}") for p in imgs], load_photo(f"{{faces}}/{{tpl}}"),
                                    fusion.FusionSettings(processes=procs),
                                    references=[load_photo(f"{{faces}}/{{p}}") for p in refs] or None)
        for i, f in enumerate(result.images):
            name = f"case{{k}}_helpers{{procs}}_image{{i}}"
            saved[name + "_pixels"], saved[name + "_mask"], saved[name + "_note"] = f.image, f.mask, np.array(f.note)
np.savez(out, **saved)
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the other version's checkout (e.g. from git archive)")
    ap.add_argument("--new", type=Path, default=REPO, help="this checkout (default)")
    ap.add_argument("--faces", type=Path, default=SHARED_FACES)
    return ap.parse_args(argv)


def outputs(tree: Path, faces: Path, folder: Path) -> dict:
    import numpy as np

    out = folder / f"{tree.resolve().name}_{abs(hash(str(tree.resolve())))}.npz"
    done = subprocess.run([sys.executable, "-c", _CHILD.format(cases=CASES), str(tree.resolve()),
                           str(faces.resolve()), str(out)], cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fusing with {tree} failed:\n{done.stderr[-3000:]}")
    with np.load(out) as held:
        return {k: held[k] for k in held.files}


def main(argv=None) -> None:
    import numpy as np

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old, new = outputs(args.old, args.faces, Path(tmp)), outputs(args.new, args.faces, Path(tmp))
    differ = sorted(k for k in set(old) | set(new)
                    if k not in old or k not in new or not np.array_equal(old[k], new[k]))
    fused = sum("fused" in str(v) and "left unfused" not in str(v) for k, v in new.items() if k.endswith("_note"))
    print(json.dumps({"outputs": len(new), "differ": differ, "same": not differ, "fused_notes": fused}), flush=True)


if __name__ == "__main__":
    main()
