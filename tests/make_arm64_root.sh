#!/usr/bin/env bash
# Build an arm64 (aarch64) Debian root with numpy, pillow and onnxruntime, for running export/run.py under
# qemu-user emulation on an x86 host: what tests/test_arm64_target.py runs, a stand-in for a Jetson's CPU.
#
#   sudo tests/make_arm64_root.sh [ROOT] [PACKAGE ...]  # ROOT: $EDGEDISTILL_ARM64_ROOT, ~/.cache/edgedistill/arm64-root
#   QEMU_CPU=cortex-a76 qemu-aarch64-static -L ROOT ROOT/usr/bin/python3 export/run.py verify BUNDLE
#
# Needs root (debootstrap), debootstrap, qemu-user-static and dpkg-deb (apt-get install debootstrap qemu-user-static),
# a Debian mirror ($MIRROR, default deb.debian.org) and PyPI. No binfmt_misc registration and no chroot: the
# packages are unpacked (debootstrap's first stage, then dpkg-deb -x of every package it fetched, python3
# included), never configured, and the interpreter runs as `qemu-aarch64-static -L ROOT`, which looks up the
# loader, libraries and files below ROOT first. About a minute (more on a busy machine); ROOT appears only
# once it is complete.
set -euo pipefail

ROOT=${1:-${EDGEDISTILL_ARM64_ROOT:-$HOME/.cache/edgedistill/arm64-root}}
shift || true
if [ $# -gt 0 ]; then PACKAGES=("$@"); else PACKAGES=(numpy pillow onnxruntime); fi
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}  # the host's Python, for pip
NICE=(nice -n 19)
export QEMU_CPU=${QEMU_CPU:-cortex-a76}  # the CPU qemu emulates: see step 4

if [ -f "$ROOT/.edgedistill-root.json" ]; then
    echo "$ROOT is already built: $(cat "$ROOT/.edgedistill-root.json")"
    exit 0
fi
for tool in debootstrap dpkg-deb qemu-aarch64-static; do
    command -v "$tool" >/dev/null ||
        { echo "error: $tool not found (apt-get install debootstrap qemu-user-static)" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 3; }

BUILD="$ROOT.partial"
rm -rf "$BUILD"
mkdir -p "$(dirname "$ROOT")"

# 1. Debian for arm64, minimal, with python3: downloaded and unpacked on this host, no arm64 code run yet.
"${NICE[@]}" debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 "$SUITE" "$BUILD" "$MIRROR" \
    > "$BUILD.log" 2>&1 || { echo "error: debootstrap failed, see $BUILD.log" >&2; tail -5 "$BUILD.log" >&2; exit 1; }
# The first stage unpacks only the essential packages; unpack the rest it fetched (python3 among them).
for deb in "$BUILD"/var/cache/apt/archives/*.deb; do
    "${NICE[@]}" dpkg-deb -x "$deb" "$BUILD"
done
rm -f "$BUILD"/var/cache/apt/archives/*.deb

# 2. The root's Python, run under emulation: proves the root works and gives the tags the wheels must match.
PYVER=$(qemu-aarch64-static -L "$BUILD" "$BUILD/usr/bin/python3" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
GLIBC=$(qemu-aarch64-static -L "$BUILD" "$BUILD/usr/bin/python3" -c 'import platform; print(platform.libc_ver()[1])')

# 3. The aarch64 wheels from PyPI, installed where Debian's python3 looks (/usr/local/lib/python3.X/dist-packages).
#    pip on the host picks and unpacks them for the target's platform; nothing is built.
PLATFORMS=(--platform manylinux2014_aarch64)
for minor in $(seq 17 "${GLIBC#2.}"); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done
TAGS=(--only-binary=:all: "${PLATFORMS[@]}" --python-version "$PYVER" --implementation cp)
WHEELS="$BUILD/var/cache/wheels"
"${NICE[@]}" "$PYTHON" -m pip download -q "${TAGS[@]}" -d "$WHEELS" "${PACKAGES[@]}"
"${NICE[@]}" "$PYTHON" -m pip install -q --root-user-action=ignore --no-index --find-links "$WHEELS" "${TAGS[@]}" \
    --no-warn-conflicts --target "$BUILD/usr/local/lib/python$PYVER/dist-packages" "${PACKAGES[@]}"

# 4. qemu-user 7.2 (Debian 12) shows the process the host's /proc/cpuinfo, and onnxruntime's CPU probe (pytorch/
#    cpuinfo) crashes on an x86 one at import. Write the arm64 cpuinfo newer qemu shows, from the features the emulated
#    CPU hands the process (AT_HWCAP, AT_HWCAP2 in /proc/self/auxv); -L ROOT makes /proc/cpuinfo read it.
#    Cortex-A76 is the emulated CPU closest to a Jetson Orin's Cortex-A78AE (ARMv8.2: NEON, dot product; no SVE).
QEMU_VERSION=$(qemu-aarch64-static --version | sed -n '1s/ version / /; 1s/ (.*//p')  # qemu-aarch64 7.2.22
HOST_CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mkdir -p "$BUILD/proc"
qemu-aarch64-static -L "$BUILD" "$BUILD/usr/bin/python3" - "$QEMU_CPU" "$HOST_CPU" "$QEMU_VERSION" \
    > "$BUILD/proc/cpuinfo" <<'PY'
import os, struct, sys
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
         "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()  # bits 0-31
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 "
          "i8mm bf16 dgh rng bti mte").split()  # arch/arm64/include/uapi/asm/hwcap.h
data = open("/proc/self/auxv", "rb").read()
aux = dict(struct.iter_unpack("QQ", data[: len(data) // 16 * 16]))
features = [n for i, n in enumerate(HWCAP) if aux.get(16, 0) >> i & 1]
features += [n for i, n in enumerate(HWCAP2) if aux.get(26, 0) >> i & 1]
cpu, host, qemu = sys.argv[1:4]
for n in range(os.cpu_count()):
    print(f"processor\t: {n}\nmodel name\t: {cpu} emulated by {qemu} on {host}\nFeatures\t: {' '.join(features)}\n"
          "CPU implementer\t: 0x41\nCPU architecture: 8\n")
PY

# 5. Record what is inside, from the emulated interpreter itself, then publish the root under its name.
DEBIAN=$(cat "$BUILD/etc/debian_version")
qemu-aarch64-static -L "$BUILD" "$BUILD/usr/bin/python3" -c '
import json, platform, sys
import numpy, PIL, onnxruntime
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "debian": sys.argv[1],
                  "qemu_cpu": sys.argv[2], "qemu": sys.argv[3], "glibc": platform.libc_ver()[1],
                  "numpy": numpy.__version__, "pillow": PIL.__version__, "onnxruntime": onnxruntime.__version__}))' \
    "$DEBIAN" "$QEMU_CPU" "$QEMU_VERSION" > "$BUILD/.edgedistill-root.json"
rm -rf "$ROOT"
mv "$BUILD" "$ROOT"
mv "$BUILD.log" "$ROOT/.debootstrap.log"
echo "built $ROOT: $(cat "$ROOT/.edgedistill-root.json")"
