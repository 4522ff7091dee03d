#!/bin/bash
# Builds Katran's balancer (unchanged source) and the harness. No lock needed.
set -euo pipefail
cd "$(dirname "$0")"
[ -d katran/katran/lib/bpf ] || { echo "clone Katran into ./katran first (see README.md)" >&2; exit 1; }
mkdir -p build/stub-include/gnu
# -target bpf has no __x86_64__, so glibc's <gnu/stubs.h> asks for stubs-32.h
# (pulled in by Katran's #include <string.h>); an empty stub satisfies it.
echo '/* empty stub, see build.sh */' > build/stub-include/gnu/stubs-32.h
CLANG=${CLANG:-clang-22}
# Katran's defaults (katran/lib/Makefile-bpf via build_bpf_modules_opensource.sh,
# EXTRA_CFLAGS empty): -DDEBUG -D__KERNEL__ -O2 -g, no feature defines
# (so: IPIP encap, no INLINE_DECAP, no GUE, no introspection, no LPM_SRC_LOOKUP,
# MAX_VIPS 512, RING_SIZE 65537, MAX_REALS 4096, MAX_CONN_RATE 125000).
KATRAN_FLAGS="-DDEBUG -D__KERNEL__ -Wno-unused-value -Wno-pointer-sign -Wno-compare-distinct-pointer-types -O2 -g -target bpf"
(cd katran && $CLANG -I. -Ikatran/lib/linux_includes -I/usr/include/x86_64-linux-gnu \
    -idirafter ../build/stub-include $KATRAN_FLAGS \
    -c katran/lib/bpf/balancer.bpf.c -o ../build/balancer.bpf.o)
# Katran's own pipeline (host clang -emit-llvm | llc -march=bpf), for comparison.
(cd katran && $CLANG -I. -Ikatran/lib/linux_includes -DDEBUG -D__KERNEL__ -Wno-unused-value \
    -Wno-pointer-sign -Wno-compare-distinct-pointer-types -O2 -emit-llvm -c -g \
    katran/lib/bpf/balancer.bpf.c -o - | /usr/lib/llvm-22/bin/llc -march=bpf -filetype=obj \
    -o ../build/balancer.katran-pipeline.o)
$CLANG -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -Wall \
    -c harness/harness.bpf.c -o build/harness.bpf.o
gcc -O2 -g -Wall -Wno-format -o build/bench harness/bench.c -lbpf
echo built: build/balancer.bpf.o build/balancer.katran-pipeline.o build/harness.bpf.o build/bench
