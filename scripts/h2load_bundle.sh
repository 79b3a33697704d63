#!/usr/bin/env bash
# Bundle this machine's h2load (Debian's nghttp2-client) with the libraries it links, for a host
# that cannot install it (a lent GPU machine without network access), so that bench/serve.py and
# bench/curve.py drive the service with the same load generator there:
#
#   scripts/h2load_bundle.sh [DIR]        # default DIR: .whl/h2load (git-ignored)
#   PATH="$PWD/DIR/bin:$PATH" python -m bench.serve --device cuda --only-ours    # on that host
#
# glibc (libc, libm, the loader) stays the host's: the bundle needs a glibc at least as new.
set -euo pipefail
dir=${1:-.whl/h2load}
binary=$(command -v h2load) || { echo "h2load is not installed (apt install nghttp2-client)" >&2; exit 1; }
mkdir -p "$dir/bin" "$dir/lib"
cp "$binary" "$dir/lib/h2load"
ldd "$binary" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|ld-linux*) ;;
    *) cp -L "$lib" "$dir/lib/" ;;
  esac
done
cat > "$dir/bin/h2load" <<'WRAPPER'
#!/usr/bin/env bash
here=$(cd "$(dirname "$0")/../lib" && pwd)
LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/h2load" "$@"
WRAPPER
chmod +x "$dir/bin/h2load"
"$dir/bin/h2load" --version
