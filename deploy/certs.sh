#!/usr/bin/env bash
# Generate everything a TLS + authenticated-SuperNode Flower deployment needs:
#
#   DIR/ca.key, DIR/ca.crt           a private CA (keep ca.key off the SuperLink host if you can)
#   DIR/server.key, DIR/server.crt   the SuperLink's certificate, signed by the CA, with a
#                                    SubjectAltName for localhost, 127.0.0.1, ::1, superlink
#                                    (the compose service name) and any extra names you give
#   DIR/supernode-N.key              SuperNode N's authentication key (OpenSSH format, ECDSA
#   DIR/supernode-N.pub              P-384: what `flower-supernode --auth-supernode-private-key`
#                                    loads and `flwr supernode register KEY.pub` accepts)
#
# Usage:
#   deploy/certs.sh [-o DIR] [-n NUM_SUPERNODES] [-d DAYS] [--force] [EXTRA_NAME ...]
#   e.g. deploy/certs.sh -n 3 superlink.example.org 203.0.113.7
#
# Environment (flags win): CERTS_DIR (default: deploy/certs next to this script),
# NUM_SUPERNODES (default 2), CERT_DAYS (default 365), SUPERLINK_SANS (extra names,
# space separated), FORCE=1.
#
# Idempotent: an existing CA and existing SuperNode keys are kept (asking for more SuperNodes
# adds keys); the server certificate is re-issued (same key) only if it is missing, does not
# verify against the CA, or lacks a requested name. Names given earlier are kept (recorded
# in DIR/server.san), so adding a name later is a re-run with just that name. --force
# regenerates everything.
#
# Private keys are written mode 600 for the current user. The official flwr/* images and the
# fedtune image run as uid 49999: on the machine that mounts them, make them readable for it,
# e.g. `sudo chown 49999:49999 DIR/server.key DIR/supernode-*.key` (see deploy/README.md).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${CERTS_DIR:-$here/certs}"
num="${NUM_SUPERNODES:-2}"
days="${CERT_DAYS:-365}"
force="${FORCE:-0}"
# shellcheck disable=SC2206  # word splitting of SUPERLINK_SANS is intended
extra=(${SUPERLINK_SANS:-})

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; }

while (($#)); do
  case "$1" in
    -o|--out) out="$2"; shift 2 ;;
    -n|--num-supernodes) num="$2"; shift 2 ;;
    -d|--days) days="$2"; shift 2 ;;
    -f|--force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "certs.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done

[[ "$num" =~ ^[0-9]+$ ]] || { echo "certs.sh: NUM_SUPERNODES must be a number, got '$num'" >&2; exit 2; }
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "certs.sh: '$tool' is required" >&2; exit 1; }
done

mkdir -p "$out"
cd "$out"
umask 077  # private keys: owner only

if [[ "$force" == 1 ]]; then
  rm -f ca.key ca.crt ca.srl server.key server.crt server.san server.csr server.ext \
    supernode-*.key supernode-*.pub
fi

# ---- names the SuperLink certificate must cover --------------------------------------------
# server.san (next to server.crt) records the names it was issued for. Re-runs keep those
# names and add new ones, so `certs.sh NEWNAME` never drops a name given earlier; use --force
# to start over with fewer names.
names=()
add_name() { [[ -n "$1" && " ${names[*]} " != *" $1 "* ]] && names+=("$1"); return 0; }
for n in localhost 127.0.0.1 ::1 superlink "${extra[@]}"; do add_name "$n"; done
if [[ -s server.san && -s server.crt ]]; then
  while read -r n; do add_name "$n"; done < server.san
fi
san=""
for n in "${names[@]}"; do
  if [[ "$n" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$n" == *:* ]]; then
    san+="${san:+,}IP:$n"   # IPv4 or IPv6 literal
  else
    san+="${san:+,}DNS:$n"
  fi
done

# ---- CA ------------------------------------------------------------------------------------
if [[ ! -s ca.key || ! -s ca.crt ]]; then
  echo "certs.sh: creating CA in $out"
  openssl ecparam -name secp384r1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha384 -days "$days" -subj "/O=fedtune/CN=fedtune CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt
  rm -f server.crt server.san  # a new CA invalidates any old server certificate
fi

# ---- SuperLink server certificate ----------------------------------------------------------
server_ok() {
  [[ -s server.key && -s server.crt && -s server.san ]] || return 1
  openssl verify -CAfile ca.crt server.crt >/dev/null 2>&1 || return 1
  local n
  for n in "${names[@]}"; do grep -qxF -- "$n" server.san || return 1; done
}
if ! server_ok; then
  echo "certs.sh: issuing server certificate for: ${names[*]}"
  if [[ -e server.key && ! -r server.key ]]; then
    echo "certs.sh: cannot read server.key (chowned to 49999 for the containers?); re-run" \
      "with sudo, or give it back: sudo chown \"\$(id -u)\" $out/server.key" >&2
    exit 1
  fi
  [[ -s server.key ]] || openssl ecparam -name prime256v1 -genkey -noout -out server.key
  openssl req -new -key server.key -subj "/O=fedtune/CN=superlink" -out server.csr
  printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=$san" > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days "$days" -sha384 -extfile server.ext -out server.crt 2>/dev/null
  printf '%s\n' "${names[@]}" > server.san
  rm -f server.csr server.ext
else
  echo "certs.sh: server certificate already covers: ${names[*]} (kept)"
fi

# ---- SuperNode authentication keys (ECDSA P-384, OpenSSH format) --------------------------
for ((i = 1; i <= num; i++)); do
  if [[ -s "supernode-$i.key" && -s "supernode-$i.pub" ]]; then
    continue
  fi
  rm -f "supernode-$i.key" "supernode-$i.key.pub" "supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedtune-supernode-$i" -f "supernode-$i.key"
  mv "supernode-$i.key.pub" "supernode-$i.pub"
  echo "certs.sh: created supernode-$i.key / supernode-$i.pub"
done

# certificates and public keys are not secret
chmod 644 ca.crt server.crt server.san
for f in supernode-*.pub; do
  if [[ -e "$f" ]]; then chmod 644 "$f"; fi
done

echo "certs.sh: done -> $out"
echo "  register each SuperNode once the SuperLink runs:  flwr supernode register $out/supernode-1.pub CONNECTION"
echo "  containers run as uid 49999: sudo chown 49999:49999 $out/server.key $out/supernode-*.key"
