#!/usr/bin/env bash
# Build build/sparkd_VERSION_ARCH.deb with dpkg-deb alone (no debhelper).
#
# The project and its runtime dependencies are installed with Debian's own python
# (/usr/bin/python3, never a virtualenv's) into /usr/lib/sparkd/python, so that compiled
# extensions (pystemd, aiohttp...) are built for the python3 the package depends on.
# Dependency wheels are kept in .whl/ (keyed on the dependency list and the python), so a
# rebuild after a source change is offline and takes seconds.
#
# Environment: PYTHON (default /usr/bin/python3), BUILD_DIR (default build), WHEELHOUSE
# (default .whl/<python tag>), DEB_COMPRESSION (default gzip) and DEB_COMPRESSION_LEVEL
# (default 6: xz saves a fifth of the size and costs seconds more), DEBFULLNAME and
# DEBEMAIL (the Maintainer field).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-/usr/bin/python3}
BUILD_DIR=${BUILD_DIR:-build}
log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x "$PYTHON" ]] || die "$PYTHON not found (scripts/bootstrap.sh --system installs it)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (apt-get install python3-pip)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"

pyproject() { "$PYTHON" -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); $1"; }
VERSION=$(pyproject 'print(p["project"]["version"])')
ARCH=$(dpkg --print-architecture)
PY_MINOR=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PY_NEXT=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
PY_TAG=$("$PYTHON" -c 'import sys, sysconfig; print("cp%d%d-%s" % (*sys.version_info[:2], sysconfig.get_platform()))')
WHEELHOUSE=${WHEELHOUSE:-.whl/$PY_TAG}
PIP_CACHE="$WHEELHOUSE.pip-cache"
DEB="$BUILD_DIR/sparkd_${VERSION}_${ARCH}.deb"
STAGE="$BUILD_DIR/deb-stage"
SRC="$BUILD_DIR/deb-src"
LIBDIR=/usr/lib/sparkd/python
DOCDIR=/usr/share/doc/sparkd
MAINTAINER="${DEBFULLNAME:-sparkd maintainers} <${DEBEMAIL:-sparkd-maintainers@example.org}>"
pip() { "$PYTHON" -m pip --disable-pip-version-check --cache-dir "$PIP_CACHE" "$@"; }

log "sparkd $VERSION for $ARCH with $("$PYTHON" --version) ($PYTHON)"
rm -rf "$STAGE" "$SRC" "$BUILD_DIR/deb-wheel" "$BUILD_DIR/deb-shlibdeps"
mkdir -p "$STAGE" "$SRC" "$BUILD_DIR/deb-wheel"

# 1. Wheels of the runtime dependencies (not the test extra) and of the build backend,
#    rebuilt only when that list or the python changes. pip gets a cache of its own: its
#    shared one would hand back wheels that another python built (the pyenv one of .venv).
REQS="$BUILD_DIR/deb-requirements.txt"
pyproject 'print(*p["project"]["dependencies"], *p["build-system"]["requires"], "wheel", sep="\n")' >"$REQS"
KEY=$({ echo "wheelhouse v2"; "$PYTHON" -c 'import sys; print(sys.version)'; cat "$REQS"; } |
  sha256sum | cut -c1-64)
if [[ "$(cat "$WHEELHOUSE/.key" 2>/dev/null)" != "$KEY" ]]; then
  log "building the dependency wheels into $WHEELHOUSE (first build, or the dependencies changed)"
  rm -rf "$WHEELHOUSE"
  mkdir -p "$WHEELHOUSE"
  pip wheel -q --wheel-dir "$WHEELHOUSE" -r "$REQS"
  echo "$KEY" >"$WHEELHOUSE/.key"
fi

# 2. The project's wheel, offline, from a clean copy: setuptools' in-tree build/lib keeps
#    modules deleted since the last build, and the copy has no __pycache__ or egg-info.
cp pyproject.toml "$SRC/"
for f in README.md LICENSE; do
  if [[ -e "$f" ]]; then cp "$f" "$SRC/"; fi
done
cp -r sparkd "$SRC/sparkd"
find "$SRC" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
# README.md is the project's readme= file: the build needs one even before it is written.
[[ -e "$SRC/README.md" ]] || echo "sparkd" >"$SRC/README.md"
pip wheel -q --no-deps --no-index --find-links "$WHEELHOUSE" --wheel-dir "$BUILD_DIR/deb-wheel" "$SRC"
WHEEL=$(echo "$BUILD_DIR"/deb-wheel/sparkd-*.whl)
[[ -f "$WHEEL" ]] || die "no sparkd wheel was built"

# 3. Install into the stage, without byte-compiling: postinst compiles for the installed
#    python and prerm removes the caches (as dh_python3's py3compile/py3clean do).
pip install -q --no-index --find-links "$WHEELHOUSE" --no-compile --no-warn-script-location \
  --root-user-action=ignore --target "$STAGE$LIBDIR" "$WHEEL"
rm -rf "${STAGE:?}$LIBDIR/bin"
find "$STAGE$LIBDIR" -name '*.so' -exec strip --strip-unneeded --remove-section=.comment \
  --remove-section=.note {} +

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
declare -A PROGRAM_MODULE=([sparkd]=sparkd.main [sparkctl]=sparkd.ctl.main)
for program in "${!PROGRAM_MODULE[@]}"; do
  write_wrapper "$program" "${PROGRAM_MODULE[$program]}"
done

# 4. Units, configuration, systemd integration, documentation. Units go to
#    /usr/lib/systemd/system (Debian 13's and Ubuntu 24.04's path, also read by Debian 12's
#    systemd; /lib is a symlink to /usr/lib on every merged-/usr system).
UNITDIR=/usr/lib/systemd/system
install -d "$STAGE$UNITDIR" "$STAGE/etc" "$STAGE/usr/lib/sysusers.d" \
  "$STAGE/usr/lib/tmpfiles.d" "$STAGE$DOCDIR" "$STAGE/usr/share/lintian/overrides" \
  "$STAGE/usr/share/man/man1" "$STAGE/usr/share/bash-completion/completions"
for unit in units/*; do
  case "$unit" in
    *.service | *.socket | *.target | *.timer | *.path | *.slice)
      install -m 0644 "$unit" "$STAGE$UNITDIR/" ;;
  esac
done

# Manual pages and bash completion, generated from the click commands being packaged, by
# the python the package depends on. The page's date is the commit's (reproducible).
MAN_DATE=$(git log -1 --format=%cs 2>/dev/null || date -u +%Y-%m-%d)
for program in sparkctl sparkd; do
  PYTHONPATH="$STAGE$LIBDIR" "$PYTHON" -s -B packaging/manpage.py "$program" "$VERSION" "$MAN_DATE" \
    >"$BUILD_DIR/$program.1" || die "the manual page of $program could not be generated"
  gzip -9n <"$BUILD_DIR/$program.1" >"$STAGE/usr/share/man/man1/$program.1.gz"
  # click's own bash completion script: it asks the command itself, which completes model
  # names from the config (sparkd/ctl/complete.py). $program has no dash: _SPARKCTL_COMPLETE.
  env "_${program^^}_COMPLETE=bash_source" "$PYTHON" -I -B -c \
    "import sys; sys.path.insert(0, '$STAGE$LIBDIR'); from ${PROGRAM_MODULE[$program]} import cli; cli(prog_name='$program')" \
    >"$STAGE/usr/share/bash-completion/completions/$program" ||
    die "the bash completion of $program could not be generated"
  grep -q "complete " "$STAGE/usr/share/bash-completion/completions/$program" ||
    die "the bash completion of $program has no complete command"
done
install -m 0644 etc/sparkd.toml "$STAGE/etc/sparkd.toml"
install -m 0644 packaging/sparkd.sysusers "$STAGE/usr/lib/sysusers.d/sparkd.conf"
install -m 0644 packaging/sparkd.tmpfiles "$STAGE/usr/lib/tmpfiles.d/sparkd.conf"
install -m 0644 packaging/lintian-overrides "$STAGE/usr/share/lintian/overrides/sparkd"
for doc in README.md docs/*.md; do
  if [[ -e "$doc" ]]; then install -m 0644 "$doc" "$STAGE$DOCDIR/"; fi
done

# copyright: sparkd's own, then every bundled distribution with the license it declares.
"$PYTHON" - "$STAGE$LIBDIR" >"$STAGE$DOCDIR/copyright" <<'PY'
import sys
import time
from email.parser import Parser
from pathlib import Path

print("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/")
print("Upstream-Name: sparkd\n")
print(f"Files: *\nCopyright: 2025-{time.gmtime().tm_year} the sparkd authors\nLicense: Apache-2.0")
print(" On Debian systems, the full text of the Apache License 2.0 is in")
print(" /usr/share/common-licenses/Apache-2.0.\n")
print("Files: usr/lib/sparkd/python/*\nCopyright: the authors of each distribution")
print("License: various")
print(" The python distributions below are bundled; each one's license texts are")
print(" in its .dist-info directory under /usr/lib/sparkd/python.")
for dist in sorted(Path(sys.argv[1]).glob("*.dist-info")):
    meta = Parser().parsestr((dist / "METADATA").read_text(errors="replace"))
    license_ = meta.get("License-Expression") or (meta.get("License") or "").split("\n")[0]
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    license_ = (license_.strip() or ", ".join(classifiers) or "see its dist-info")[:70]
    print(f" .\n {meta['Name']} {meta['Version']}: {license_}")
PY
GIT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
printf 'sparkd (%s) unstable; urgency=medium\n\n  * Built from git commit %s.\n\n -- %s  %s\n' \
  "$VERSION" "$GIT_COMMIT" "$MAINTAINER" "$(date -R)" | gzip -9n >"$STAGE$DOCDIR/changelog.gz"

# Everything root-owned (dpkg-deb --root-owner-group), nothing group/world writable.
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f -exec chmod go-w {} +

# 5. Control files. Shared-library dependencies of the compiled extensions (libc6,
#    libsystemd0...) come from dpkg-shlibdeps, which wants a debian/control to read.
SHLIBS_DEPENDS=""
if command -v dpkg-shlibdeps >/dev/null; then
  mkdir -p "$BUILD_DIR/deb-shlibdeps/debian"
  printf 'Source: sparkd\n\nPackage: sparkd\nArchitecture: any\n' \
    >"$BUILD_DIR/deb-shlibdeps/debian/control"
  mapfile -t OBJECTS < <(find "$(realpath "$STAGE")$LIBDIR" -name '*.so' | sort)
  if ((${#OBJECTS[@]})) && SHLIBS=$(cd "$BUILD_DIR/deb-shlibdeps" &&
    dpkg-shlibdeps -O --ignore-missing-info -e "${OBJECTS[@]}" 2>../deb-shlibdeps.log); then
    SHLIBS_DEPENDS=$(sed -n 's/^shlibs:Depends=//p' <<<"$SHLIBS")
  else
    log "warning: dpkg-shlibdeps failed (see $BUILD_DIR/deb-shlibdeps.log): no libc6 dependency"
  fi
fi
install -d "$STAGE/DEBIAN"
INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
# procps: /bin/kill, which the units' ExecReload= runs (a minimal Debian has none).
DEPENDS="python3 (>= $PY_MINOR), python3 (<< $PY_NEXT), ${SHLIBS_DEPENDS:-libc6, libsystemd0}, procps, libudev1"
sed -e "s#@VERSION@#$VERSION#" -e "s#@ARCH@#$ARCH#" -e "s#@INSTALLED_SIZE@#$INSTALLED_SIZE#" \
  -e "s#@DEPENDS@#$DEPENDS#" -e "s#@MAINTAINER@#$MAINTAINER#" \
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
