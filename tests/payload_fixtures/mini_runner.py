"""A stand-in for gpu_magic.runner, run in a fresh interpreter by tests/test_payload.py.

It loads the inputs the way the runner does (blobs read into writable bytearrays,
``_payload.loads(..., namespace=ns)`` then ``ns.update(values)``), runs the cell source with
``exec`` in ``ns``, and packs the names to return with ``_payload.dumps(..., namespace=ns)``,
unchanged inputs travelling back as references.

    python mini_runner.py JOB_DIR

JOB_DIR holds ``job.json`` ({"buffers": [...], "cell": str, "returns": [...], "refs": [...]}),
``in.pkl`` and the buffer files it names; the result goes to ``out.pkl``, ``out.<i>`` and
``out.json`` ({"buffers": [...], "digests": [...]}).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpu_magic import _payload


def main(job: Path) -> None:
    spec = json.loads((job / "job.json").read_text())
    buffers = [bytearray((job / name).read_bytes()) for name in spec["buffers"]]
    ns: dict = {"__name__": "__main__"}
    values = _payload.loads((job / "in.pkl").read_bytes(), buffers, namespace=ns)
    ns.update(values)
    exec(compile(spec["cell"], "<cell>", "exec"), ns)
    refs = {id(values[n]): n for n in spec["refs"]}
    packed, _ = _payload.dumps({n: ns[n] for n in spec["returns"]}, namespace=ns, input_refs=refs)
    (job / "out.pkl").write_bytes(packed.pickle)
    names = []
    for i, buf in enumerate(packed.buffers):
        names.append(f"out.{i}")
        (job / names[-1]).write_bytes(buf)
    (job / "out.json").write_text(json.dumps({"buffers": names, "digests": packed.buffer_digests}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
