#!/usr/bin/env bash
# Installs the system tools some tests use, when missing: chromium (headless check of the monitoring
# dashboard) and promtool (Debian package prometheus; checks monitoring/prometheus-rules.yml).
# Tests that need a missing tool skip with the reason, so this is best effort, never fatal.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_test_tools: missing ${need[*]} (install them; tests needing them will be skipped)" >&2
  exit 0
fi
echo "ensure_test_tools: installing ${need[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends keeps chromium from pulling a desktop; prometheus' postinst does not start
# a daemon inside a container without an init system.
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } \
  || echo "ensure_test_tools: could not install ${need[*]}; dependent tests will be skipped" >&2
exit 0
