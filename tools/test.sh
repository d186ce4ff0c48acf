#!/usr/bin/env bash
# The project's whole test suite: the host tests (cargo test), then the real-kernel tests in the
# VM rig (every configuration on a Linux 6.12 and a Linux 7.3 guest kernel). Installs what it needs
# itself (Debian packages; the 7.3 source from trixie-backports through private apt lists). Exits
# non-zero if anything failed or did not run.
#
# Under CI (CI=true) features this kind of machine has are required, so their tests fail instead
# of skipping: /dev/kvm and mmap-able guest_memfd on the host; inside the rig, what each
# configuration provides (the rig sets that itself).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${CI:-}" == "true" && -z "${GMEM_DMA_REQUIRE:-}" ]]; then
    export GMEM_DMA_REQUIRE=kvm,guest-memfd-mmap
fi

echo "== host tests (cargo test --workspace)"
cargo test --workspace

echo "== real-kernel tests (VM rig)"
cargo run --release -p vm-rig --bin vm-rig -- run
