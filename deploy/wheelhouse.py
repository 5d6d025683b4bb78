"""The Python half of `deploy/wheelhouse.sh`: stand-in wheels for a target's own torch, and the
check that a wheelhouse installs with no index on its target.

`stub NAME VERSION DIR` writes an empty wheel `NAME-VERSION+stub-py3-none-any.whl` with no
dependencies. `wheelhouse.sh --without-torch` resolves against stubs of torch and torchvision at
the target's versions, so pip never looks at the real torch: resolving the real one for another
Python makes pip fetch candidate torch wheels (0.5-0.9 GB each) and their nvidia-* wheels just to
read their metadata, and back-track through torch releases (measured here: 1-2 min and several
GB per resolution), only for all of it to be thrown away.

`check DIR PYVER [--without-torch]` fails (exit 1, one line per problem) unless DIR is a
wheelhouse that `pip install --no-index` can install on CPython PYVER, Linux x86_64:

- every wheel's tags fit the target (cpXY / abi3 / py3, manylinux x86_64 or any);
- one version of each package;
- every requirement reached from the project's wheel, markers evaluated for the target (pip
  evaluates them for the Python that runs it, which may be another version), has a wheel whose
  version it admits; with `--without-torch` torch and torchvision are the target's own, and
  none of torch's CUDA stack (triton, nvidia-*, cuda-*) is shipped.

It prints the wheel count, the total size and the largest wheels. Runs on the Python that runs
pip, with pip's own copy of `packaging` when `packaging` is not installed.

>>> target_environment("3.12")["python_full_version"]
'3.12.0'
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.tags import Tag, compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # a bare build machine: pip always carries its own copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.tags import (  # type: ignore[no-redef]
        Tag,
        compatible_tags,
        cpython_tags,
    )
    from pip._vendor.packaging.utils import (  # type: ignore[no-redef]
        canonicalize_name,
        parse_wheel_filename,
    )

PROJECT = "contrastive-service"
# glibc >= 2.28 on the target (every current GPU distribution; torch and Ray need it anyway).
# pip matches --platform tags exactly, so wheelhouse.sh passes this whole list (`platforms`).
MANYLINUX = ("2_28", "2_27", "2_26", "2_24", "2_17", "2_12", "2_5", "2014", "2010", "1")
# With --without-torch: the target's own, so not resolved, and (with its CUDA stack) not shipped.
TARGET_OWNS = ("torch", "torchvision")
NOT_SHIPPED = ("torch", "torchvision", "torchaudio", "triton", "nvidia-*", "cuda-*")


def platforms() -> list[str]:
    """The Linux x86_64 platform tags a wheel may carry for the target.

    >>> platforms()[:2], platforms()[-1]
    (['manylinux_2_28_x86_64', 'manylinux_2_27_x86_64'], 'manylinux1_x86_64')
    """
    return [f"manylinux{'_' if '_' in v else ''}{v}_x86_64" for v in MANYLINUX]


def stub_wheel(name: str, version: str, folder: Path) -> Path:
    """An empty wheel standing for the target's installed ``name`` (version ``version+stub``)."""
    full = f"{version}+stub"
    info = f"{name}-{full}.dist-info"
    path = folder / f"{name}-{full}-py3-none-any.whl"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {full}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelhouse\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
        zf.writestr(f"{info}/RECORD", "".join(f"{a},,\n" for a in [*files, f"{info}/RECORD"]))
    return path


def target_environment(pyver: str) -> dict[str, str]:
    """PEP 508 marker values of CPython ``pyver`` on Linux x86_64."""
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{pyver}.0",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
        "python_full_version": f"{pyver}.0",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_version": "",
        "python_version": pyver,
        "sys_platform": "linux",
    }


def target_tags(pyver: str) -> set[Tag]:
    """Every wheel tag CPython ``pyver`` on manylinux x86_64 installs."""
    version = tuple(int(p) for p in pyver.split("."))
    interpreter = f"cp{version[0]}{version[1]}"
    return {
        *cpython_tags(version, abis=[interpreter, "abi3", "none"], platforms=platforms()),
        *compatible_tags(version, interpreter, platforms()),
    }


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` entries."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(name).decode())
    return [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]


def _applies(req: Requirement, env: dict[str, str], extras: frozenset[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in {"", *extras})


def _closure(wheels: dict[str, Path], pyver: str, owned: tuple[str, ...]) -> tuple[set, list]:
    """(names reached from the project, requirements the wheelhouse cannot meet)."""
    env, problems = target_environment(pyver), []
    todo: list[tuple[str, frozenset[str]]] = [(PROJECT, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for req in requirements(wheels[name]):
            dep = canonicalize_name(req.name)
            if not _applies(req, env, extras) or dep in owned:
                continue
            if dep not in wheels:
                problems.append(f"{name} needs {req} (no wheel of {dep})")
            elif not req.specifier.contains(_version(wheels[dep]), prereleases=True):
                problems.append(f"{name} needs {req}, the wheelhouse has {wheels[dep].name}")
            else:
                todo.append((dep, frozenset(req.extras)))
    return {n for n, _ in seen}, problems


def _version(wheel: Path) -> str:
    return str(parse_wheel_filename(wheel.name)[1])


def check(folder: Path, pyver: str, without_torch: bool) -> list[str]:
    """What keeps ``folder`` from installing offline on the target (empty: nothing)."""
    wheels: dict[str, Path] = {}
    problems, tags = [], target_tags(pyver)
    for wheel in sorted(folder.glob("*.whl")):
        name, _, _, wheel_tags = parse_wheel_filename(wheel.name)
        if name in wheels:
            problems.append(f"two versions of {name}: {wheels[name].name}, {wheel.name}")
        if not wheel_tags & tags:
            problems.append(f"{wheel.name} does not install on CPython {pyver} manylinux x86_64")
        if without_torch and any(fnmatch.fnmatch(name, p) for p in NOT_SHIPPED):
            problems.append(f"{wheel.name}: the target's torch brings its own")
        wheels[name] = wheel
    if PROJECT not in wheels:
        return [*problems, f"no {PROJECT} wheel in {folder}"]
    reached, unmet = _closure(wheels, pyver, TARGET_OWNS if without_torch else ())
    unused = sorted(set(wheels) - reached)
    if unused:  # pip ran on another Python and took a wheel only that Python needs: harmless
        print(f"note: not needed on CPython {pyver}: {', '.join(unused)}", file=sys.stderr)
    return problems + unmet


def summary(folder: Path, largest: int = 5) -> str:
    """Wheel count, total size and the largest wheels, in MB."""
    wheels = sorted(folder.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    total = sum(p.stat().st_size for p in wheels) / 1e6
    top = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f}" for p in wheels[:largest])
    return f"{len(wheels)} wheels, {total:.1f} MB; largest (MB): {top}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stub = sub.add_parser("stub", help="write an empty stand-in wheel")
    stub.add_argument("name")
    stub.add_argument("version")
    stub.add_argument("folder", type=Path)
    checked = sub.add_parser("check", help="check a wheelhouse for its target")
    checked.add_argument("folder", type=Path)
    checked.add_argument("pyver")
    checked.add_argument("--without-torch", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "stub":
        print(stub_wheel(args.name, args.version, args.folder))
        return 0
    problems = check(args.folder, args.pyver, args.without_torch)
    for problem in problems:
        print(f"wheelhouse: {problem}", file=sys.stderr)
    print(summary(args.folder))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
