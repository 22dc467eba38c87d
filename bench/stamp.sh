#!/bin/sh
# The benchmarks' CLI start: `stamp.sh STAMP_FILE OUTPUT_DIR COMMAND...` appends
# "<unix time> <output dir>" to STAMP_FILE, then execs COMMAND. A shell starts in ~1 ms, so the
# stamp is when the worker's CLI process began, not when an interpreter finished importing.
stamp=$1 out=$2
shift 2
echo "$(date +%s.%N) $out" >> "$stamp"
exec "$@"
