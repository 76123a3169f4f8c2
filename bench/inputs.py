"""Carry a digits study's fixed inputs to another machine, so a study split over calls stays on one teacher.

    python bench/inputs.py pack ARCHIVE.tar.gz      # from out/digits and out/capacity (the scripts' defaults)
    python bench/inputs.py unpack ARCHIVE.tar.gz    # into the same folders; the scripts then reuse them

FDs of different calls compare only under one teacher and one classifier, and neither training repeats bit
for bit on another CPU (the digits teacher rebuilt on two machines measured FD to data 45.71 and 45.45).
The archive holds what bench/capacity.py reads before its students train: bench/digits.py's teacher,
paired set and classifier, the teacher's sample sets (the FD references and floors) and the TSM starts
(MSD Sec. 3.3); not the students, nor the K = 1 curves that set a budget (for studies at an imposed
--budget). Unpacking never replaces a file that differs (that would mix teachers
into one study): it stops and names the file. A manifest of SHA-256 digests goes inside.
"""
import argparse
import hashlib
import io
import json
import os
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def members(digits, out):
    """-> {name in the archive: path on disk} of the fixed inputs found under the two folders."""
    found = {}
    for name in ("teacher/student.pt", "pairs.npz"):
        found[f"digits/{name}"] = os.path.join(digits, name)
    found.update({f"digits/{f}": os.path.join(digits, f) for f in sorted(os.listdir(digits)) if f.startswith("classifier_e")})
    for folder in ("teacher_samples", "teacher_floor"):
        found.update({f"capacity/{folder}/{f}": os.path.join(out, folder, f) for f in sorted(os.listdir(os.path.join(out, folder)))})
    for size in sorted(f for f in os.listdir(out) if f.startswith("c") and os.path.isdir(os.path.join(out, f, "tsm"))):
        for run in sorted(os.listdir(os.path.join(out, size, "tsm"))):
            for f in ("student.pt", "student.pt.cpu_s"):
                if os.path.exists(os.path.join(out, size, "tsm", run, f)):
                    found[f"capacity/{size}/tsm/{run}/{f}"] = os.path.join(out, size, "tsm", run, f)
    empty = [os.path.join(out, size, "tsm", run) for size in sorted(os.listdir(out)) if os.path.isdir(os.path.join(out, size, "tsm"))
             for run in os.listdir(os.path.join(out, size, "tsm")) if f"capacity/{size}/tsm/{run}/student.pt" not in found]
    missing = [p for p in found.values() if not os.path.exists(p)] + [f"a classifier_e*.pt in {digits}"] * (
        not any(n.startswith("digits/classifier_e") for n in found)) + [f"{p}/student.pt" for p in empty]
    if missing:
        raise FileNotFoundError(f"not there to pack: {missing} (run the study's first call, which makes them)")
    return found


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pack(archive, digits, out):
    files = members(digits, out)
    manifest = json.dumps({name: sha256(path) for name, path in files.items()}, indent=1).encode()
    tmp = archive + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for name, path in files.items():
            tar.add(path, arcname=name)
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    os.replace(tmp, archive)
    print(f"packed {len(files)} files into {archive} ({os.path.getsize(archive) / 2**20:.1f} MiB)")
    return files


def unpack(archive, digits, out):
    roots = {"digits": digits, "capacity": out}
    with tarfile.open(archive, "r:gz") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        def target(name):
            root, _, rest = name.partition("/")
            path = os.path.normpath(os.path.join(roots.get(root, "/nonexistent"), rest))
            if root not in roots or not path.startswith(os.path.normpath(roots[root]) + os.sep):
                raise ValueError(f"{archive}: {name!r} is not a path under digits/ or capacity/")
            return path
        runs = [os.path.join(out, d, r) for d in (os.listdir(out) if os.path.isdir(out) else [])
                if os.path.isdir(os.path.join(out, d, "tsm")) for r in os.listdir(os.path.join(out, d)) if r != "tsm"]
        if runs:
            raise FileExistsError(f"{out} already holds students' runs ({runs[:3]}): they would be reused beside another "
                                  "teacher's inputs; unpack into an empty folder")
        clash = [target(n) for n, digest in manifest.items() if os.path.exists(target(n)) and sha256(target(n)) != digest]
        if clash:
            raise FileExistsError(f"these differ from the archive's (another teacher's inputs?): {clash[:5]}"
                                  f"{' ...' if len(clash) > 5 else ''}; move the folders aside to unpack")
        for name, digest in sorted(manifest.items(), key=lambda kv: kv[0].endswith("dataset.json")):  # a folder's index last
            data = tar.extractfile(name).read()
            if hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"{archive}: {name} does not match its manifest digest")
            path = target(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
    print(f"unpacked {len(manifest)} files from {archive} into {digits} and {out}")
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("pack", "unpack"))
    p.add_argument("archive", help="a .tar.gz file")
    p.add_argument("--digits", default=os.path.join(ROOT, "out", "digits"), help="bench/digits.py's folder")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "capacity"), help="bench/capacity.py's working folder")
    args = p.parse_args(argv)
    if args.action == "unpack" and not os.path.exists(args.archive):
        p.error(f"no archive at {args.archive}")
    return (pack if args.action == "pack" else unpack)(args.archive, args.digits, args.out)


if __name__ == "__main__":
    main()
