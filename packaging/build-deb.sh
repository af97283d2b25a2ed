#!/usr/bin/env bash
# Build build/sparkd_VERSION_ARCH.deb with dpkg-deb alone (no debhelper).
#
# The project and its runtime dependencies are installed with Debian's own python
# (/usr/bin/python3, never a virtualenv's) into /usr/lib/sparkd/python, so that compiled
# extensions (pystemd, psutil, aiohttp...) match the ABI of the python3 the package
# depends on. Dependency wheels are kept in .whl/ (keyed on the dependency list and the
# python), so a rebuild after a source change is offline and takes seconds.
#
# Environment: PYTHON (default /usr/bin/python3), BUILD_DIR (default build),
# WHEELHOUSE (default .whl/<python tag>), DEB_COMPRESSION (default gzip) and
# DEB_COMPRESSION_LEVEL (default 6: xz saves 20% of the size and costs 2 s more).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

PYTHON=${PYTHON:-/usr/bin/python3}
BUILD_DIR=${BUILD_DIR:-build}
log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x "$PYTHON" ]] || die "$PYTHON not found (scripts/bootstrap.sh --system installs it)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (apt-get install python3-pip)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"

VERSION=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
PY_MINOR=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PY_NEXT=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
PY_TAG=$("$PYTHON" -c 'import sys, sysconfig; print("cp%d%d-%s" % (*sys.version_info[:2], sysconfig.get_platform()))')
WHEELHOUSE=${WHEELHOUSE:-.whl/$PY_TAG}
DEB="$BUILD_DIR/sparkd_${VERSION}_${ARCH}.deb"
STAGE="$BUILD_DIR/deb-stage"
SRC="$BUILD_DIR/deb-src"
LIBDIR=/usr/lib/sparkd/python

log "sparkd $VERSION for $ARCH with $("$PYTHON" --version) ($PYTHON)"
rm -rf "$STAGE" "$SRC" "$BUILD_DIR/deb-wheel"
mkdir -p "$STAGE" "$SRC" "$BUILD_DIR/deb-wheel" "$WHEELHOUSE"

# 1. The project's wheel, built from a clean copy: setuptools' in-tree build/lib keeps
#    modules deleted since the last build, and the copy has no __pycache__ or egg-info.
cp pyproject.toml "$SRC/"
for f in README.md LICENSE; do
  if [[ -e "$f" ]]; then cp "$f" "$SRC/"; fi
done
cp -r sparkd "$SRC/sparkd"
find "$SRC" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
# README.md is the project's readme= file: the build needs one even before it is written.
[[ -e "$SRC/README.md" ]] || echo "sparkd" >"$SRC/README.md"

# setuptools (the build backend) comes from the wheelhouse too, so this step is offline.
if ! compgen -G "$WHEELHOUSE/setuptools-*.whl" >/dev/null; then
  log "fetching the build backend into $WHEELHOUSE"
  "$PYTHON" -m pip wheel -q --wheel-dir "$WHEELHOUSE" 'setuptools>=68' wheel
fi
"$PYTHON" -m pip wheel -q --no-deps --no-index --find-links "$WHEELHOUSE" \
  --wheel-dir "$BUILD_DIR/deb-wheel" "$SRC"
WHEEL=$(echo "$BUILD_DIR"/deb-wheel/sparkd-*.whl)
[[ -f "$WHEEL" ]] || die "no sparkd wheel was built"

# 2. Runtime dependencies (not the test extra) as wheels, rebuilt only when the list changes.
REQS="$BUILD_DIR/deb-requirements.txt"
"$PYTHON" - "$WHEEL" >"$REQS" <<'PY'
import sys
import zipfile
from email.parser import Parser

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(wheel.read(name).decode())
for requirement in metadata.get_all("Requires-Dist") or []:
    if "extra ==" not in requirement:
        print(requirement)
PY
KEY=$({ cat "$REQS"; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-64)
if [[ "$(cat "$WHEELHOUSE/.key" 2>/dev/null)" != "$KEY" ]]; then
  log "building dependency wheels into $WHEELHOUSE (first build, or the dependencies changed)"
  "$PYTHON" -m pip wheel -q --wheel-dir "$WHEELHOUSE" --find-links "$WHEELHOUSE" -r "$REQS"
  echo "$KEY" >"$WHEELHOUSE/.key"
fi

# 3. Install into the stage. Byte-compile ourselves, with the installed path recorded,
#    so that root running sparkd never writes __pycache__ under /usr/lib/sparkd.
"$PYTHON" -m pip install -q --no-index --find-links "$WHEELHOUSE" --no-compile \
  --no-warn-script-location --root-user-action=ignore --target "$STAGE$LIBDIR" "$WHEEL"
rm -rf "$STAGE$LIBDIR/bin"
"$PYTHON" -m compileall -q -j 0 -s "$STAGE" -p / "$STAGE$LIBDIR" >/dev/null

mkdir -p "$STAGE/usr/bin"
write_wrapper() { # name module
  cat >"$STAGE/usr/bin/$1" <<EOF
#!/usr/bin/python3 -I
# $1: installed by the sparkd package. Its python code lives in $LIBDIR.
import sys

sys.path.insert(0, "$LIBDIR")

from $2 import main

sys.exit(main())
EOF
  chmod 0755 "$STAGE/usr/bin/$1"
}
write_wrapper sparkd sparkd.main
write_wrapper sparkctl sparkd.cli

# 4. Units, configuration, systemd integration, documentation.
install -d "$STAGE/lib/systemd/system" "$STAGE/etc" "$STAGE/usr/lib/sysusers.d" \
  "$STAGE/usr/lib/tmpfiles.d" "$STAGE/usr/share/doc/sparkd"
for unit in units/*; do
  case "$unit" in
    *.service | *.socket | *.target | *.timer | *.path | *.slice)
      install -m 0644 "$unit" "$STAGE/lib/systemd/system/" ;;
  esac
done
install -m 0644 etc/sparkd.toml "$STAGE/etc/sparkd.toml"
install -m 0644 packaging/sparkd.sysusers "$STAGE/usr/lib/sysusers.d/sparkd.conf"
install -m 0644 packaging/sparkd.tmpfiles "$STAGE/usr/lib/tmpfiles.d/sparkd.conf"
for doc in README.md docs/*.md; do
  if [[ -e "$doc" ]]; then install -m 0644 "$doc" "$STAGE/usr/share/doc/sparkd/"; fi
done

# Everything root-owned (dpkg-deb --root-owner-group), nothing group/world writable.
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f -exec chmod go-w {} +

# 5. Control files.
install -d "$STAGE/DEBIAN"
INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@INSTALLED_SIZE@/$INSTALLED_SIZE/" \
  -e "s/@PYTHON_DEPENDS@/python3 (>= $PY_MINOR), python3 (<< $PY_NEXT)/" \
  packaging/debian/control.in >"$STAGE/DEBIAN/control"
echo /etc/sparkd.toml >"$STAGE/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "packaging/debian/$script" "$STAGE/DEBIAN/$script"
done
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' |
  LC_ALL=C sort -z | xargs -0 md5sum) >"$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles" "$STAGE/DEBIAN/md5sums"

# 6. The package, written under a temporary name so that a failed build leaves no .deb.
TMP_DEB="$DEB.tmp"
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-gzip}" -z"${DEB_COMPRESSION_LEVEL:-6}" \
  --build "$STAGE" "$TMP_DEB" >/dev/null
mv -f "$TMP_DEB" "$DEB"
log "built $DEB ($(du -h "$DEB" | cut -f1), installed size ${INSTALLED_SIZE} KiB)"
