"""Kernel trees and initramfs images for the VM harness (stdlib only).

The cache directory (``$TLSHD_CACHE``, default ``<repo>/.cache``) holds one
unpacked Debian kernel tree per version under ``kernels/<kver>/`` and one
initramfs per version under ``initramfs/``.  ``tools/setup`` unpacks the
packages and calls ``prepare``; each tree then carries a ``harness.json``
that tells ``vm-run`` how to boot it.

Usage (run with /usr/bin/python3):
    vmimage.py prepare TREE KVER   extract the boot image, write harness.json
    vmimage.py initramfs [KVER]    (re)build stale initramfs images
    vmimage.py list                print "KVER TREE" per prepared kernel
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
STAGE1 = TOOLS / "vm" / "init"
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

# Bumped whenever the layout of the initramfs itself changes.
INITRAMFS_FORMAT = "1"

# Modules stage 1 needs before it can mount the host root: virtio PCI
# transport, 9p, overlayfs, configfs and the virtio console (output ports).
# ``modprobe --show-depends`` adds dependencies and skips built-ins.
REQUIRED_MODULES = (
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
    "configfs",
)
# Nice to have: entropy from the host.
OPTIONAL_MODULES = ("virtio_rng",)

# Compressed payload magics inside a bzImage, with their decompressors.
PAYLOAD_MAGICS = (
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"]),
    (b"\xfd7zXZ\x00", ["xz", "-dcq"]),
    (b"\x1f\x8b\x08", ["gzip", "-dcq"]),
)


def cache_dir() -> Path:
    return Path(os.environ.get("TLSHD_CACHE") or REPO / ".cache")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A prepared kernel tree; paths in harness.json are tree-relative."""

    kver: str
    tree: Path
    image: Path  # what qemu -kernel boots (ELF vmlinux or bzImage)
    boot: str  # "pvh" (ELF vmlinux) or "bzimage"
    modbase: Path  # BASE for modprobe -d / depmod -b
    moddir: Path  # BASE/lib/modules/KVER

    def matches(self, want: str) -> bool:
        """'7' matches 7.3.4+deb13-amd64, '6.12' matches 6.12.117+..."""
        return self.kver == want or self.kver.startswith(want + ".")

    def version(self) -> tuple[int, ...]:
        nums = re.match(r"[\d.]+", self.kver)
        text = nums.group(0).strip(".") if nums else "0"
        return tuple(int(x) for x in text.split("."))


# ------------------------------------------------------------- prepare


def module_base(tree: Path, kver: str) -> Path:
    """6.12 packages use lib/modules, 7.x packages usr/lib/modules."""
    if (tree / "lib" / "modules" / kver).is_dir():
        return tree
    return tree / "usr"


def find_bzimage(tree: Path, kver: str) -> Path:
    for cand in (
        tree / "boot" / f"vmlinuz-{kver}",
        tree / "usr" / "lib" / "modules" / kver / "vmlinuz",
        tree / "lib" / "modules" / kver / "vmlinuz",
    ):
        if cand.is_file():
            return cand
    raise SystemExit(f"vmimage: no vmlinuz for {kver} in {tree}")


def extract_elf(bzimage: Path, out: Path) -> bool:
    """Decompress the kernel payload of a bzImage into an ELF vmlinux.

    Try every compression magic found in the file; the right one is the
    one whose output starts with the ELF magic.  Decompressors complain
    about the trailing bytes after the payload, so their exit status is
    ignored.
    """
    data = bzimage.read_bytes()
    for magic, cmd in PAYLOAD_MAGICS:
        pos = data.find(magic)
        while pos != -1:
            with open(out, "wb") as f:
                subprocess.run(
                    cmd,
                    input=data[pos:],
                    stdout=f,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            with open(out, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return True
            pos = data.find(magic, pos + 1)
    out.unlink(missing_ok=True)
    return False


def prepare(tree: Path, kver: str) -> None:
    """Pick the boot image and write harness.json for a fresh tree."""
    bzimage = find_bzimage(tree, kver)
    base = module_base(tree, kver)
    image, boot = bzimage, "bzimage"
    # 6.12: boot the ELF vmlinux through its PVH entry, which saves the
    # bzImage decompression under TCG (pitfall 3).  7.x hangs on that path
    # (pitfall 23), so it keeps the bzImage.
    if kver.startswith("6.") and extract_elf(bzimage, tree / "vmlinux"):
        image, boot = tree / "vmlinux", "pvh"
    meta = {
        "kver": kver,
        "image": str(image.relative_to(tree)),
        "boot": boot,
        "modbase": str(base.relative_to(tree)),
    }
    (tree / "harness.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_kernel(tree: Path) -> Kernel:
    meta = json.loads((tree / "harness.json").read_text())
    base = tree / meta["modbase"]
    return Kernel(
        kver=meta["kver"],
        tree=tree,
        image=tree / meta["image"],
        boot=meta["boot"],
        modbase=base,
        moddir=base / "lib" / "modules" / meta["kver"],
    )


def kernels() -> list[Kernel]:
    """All prepared kernels in the cache, oldest version first."""
    found = [
        load_kernel(meta.parent)
        for meta in (cache_dir() / "kernels").glob("*/harness.json")
    ]
    return sorted(found, key=Kernel.version)


def select_kernel(want: str) -> Kernel:
    """The newest prepared kernel matching WANT ('6.12', '7' or a kver)."""
    matching = [k for k in kernels() if k.matches(want)]
    if not matching:
        have = ", ".join(k.kver for k in kernels()) or "none"
        raise LookupError(
            f"no prepared kernel matches {want!r} (have: {have}); "
            "run tools/setup"
        )
    return matching[-1]


# ------------------------------------------------------------ initramfs


def busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        if cand.is_file():
            return cand
    raise SystemExit("vmimage: busybox-static is not installed")


def knows_builtins(kernel: Kernel) -> bool:
    return (kernel.moddir / "modules.builtin").is_file()


def module_paths(kernel: Kernel) -> list[Path]:
    """Module files to insmod in stage 1, dependencies first."""
    paths: list[Path] = []
    for name in REQUIRED_MODULES + OPTIONAL_MODULES:
        proc = subprocess.run(
            [
                "modprobe",
                "-d",
                str(kernel.modbase),
                "-S",
                kernel.kver,
                "--show-depends",
                name,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            if name in OPTIONAL_MODULES or not knows_builtins(kernel):
                # 7.x trees lack modules.builtin, so modprobe cannot tell
                # a built-in (virtio_pci there) from a missing module; a
                # module really missing shows up as a failed boot.
                continue
            raise SystemExit(f"vmimage: {kernel.kver}: {proc.stderr.strip()}")
        # "insmod /path/x.ko.xz [options]" per module; built-ins print
        # "builtin x" and need nothing.
        for line in proc.stdout.splitlines():
            words = line.split()
            if words[:1] == ["insmod"]:
                path = Path(words[1])
                if path not in paths:
                    paths.append(path)
    return paths


def read_module(path: Path) -> bytes:
    """Uncompressed module bytes: busybox insmod cannot decompress."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        proc = subprocess.run(
            ["zstd", "-dcq"], input=data, capture_output=True, check=True
        )
        return proc.stdout
    return data


class Cpio:
    """A minimal writer for the kernel's "newc" initramfs format.

    Written here rather than with cpio(1) so that /dev/console can be a
    device node without a root-owned staging directory, and so that the
    archive is byte-for-byte reproducible.
    """

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 0

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        self.ino += 1
        fields = (
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name) + 1,
            0,
        )
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._write_padded(hdr + name.encode() + b"\0")
        self._write_padded(data)

    def _write_padded(self, data: bytes) -> None:
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(kernel: Kernel) -> bytes:
    mods = module_paths(kernel)
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules"):
        cpio.directory(d)
    # The kernel opens /dev/console for init's stdio before /init runs.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox().read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", STAGE1.read_bytes(), 0o755)
    names = []
    for path in mods:
        name = path.name.split(".ko")[0] + ".ko"
        names.append(name)
        cpio.file(f"lib/modules/{name}", read_module(path))
    cpio.file("modules", "".join(n + "\n" for n in names).encode())
    return gzip.compress(cpio.finish(), compresslevel=1, mtime=0)


def initramfs_path(kernel: Kernel) -> Path:
    return cache_dir() / "initramfs" / f"initramfs-{kernel.kver}.cpio.gz"


def initramfs_stamp(kernel: Kernel) -> str:
    """Changes whenever stage 1, busybox or the kernel tree change."""
    h = hashlib.sha256()
    h.update(INITRAMFS_FORMAT.encode())
    h.update(kernel.kver.encode())
    h.update(STAGE1.read_bytes())
    h.update((kernel.tree / "harness.json").read_bytes())
    st = busybox().stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Concurrent runs may build the same image: rename, never overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_initramfs(kernel: Kernel) -> tuple[Path, bool]:
    """The kernel's initramfs, rebuilt if stale; (path, rebuilt)."""
    path = initramfs_path(kernel)
    stamp_path = path.with_name(path.name + ".stamp")
    stamp = initramfs_stamp(kernel)
    try:
        if path.is_file() and stamp_path.read_text().strip() == stamp:
            return path, False
    except FileNotFoundError:
        pass
    write_atomic(path, build_initramfs(kernel))
    write_atomic(stamp_path, (stamp + "\n").encode())
    return path, True


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("tree", type=Path)
    p.add_argument("kver")
    p = sub.add_parser("initramfs")
    p.add_argument("kver", nargs="*")
    sub.add_parser("list")
    args = ap.parse_args(argv)

    if args.cmd == "prepare":
        prepare(args.tree.resolve(), args.kver)
    elif args.cmd == "initramfs":
        for k in kernels():
            if args.kver and k.kver not in args.kver:
                continue
            path, rebuilt = ensure_initramfs(k)
            if rebuilt:
                print(f"initramfs: built {path}")
    else:
        for k in kernels():
            print(k.kver, k.tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
