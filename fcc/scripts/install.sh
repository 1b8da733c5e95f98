#!/bin/bash
# corekube-install.service: puts the pinned binaries from the image disk where the
# units expect them. /usr/local and /opt are writable on FCOS; every boot starts from
# a fresh root (-snapshot), so this runs at every boot and is idempotent.
set -euo pipefail

disk=${COREKUBE_DISK:-/var/mnt/corekube}
root=${COREKUBE_ROOT:-}   # a scratch root in tests; empty on a node

bin="$root/usr/local/bin"
cni="$root/opt/cni/bin"
mkdir -p "$bin" "$cni"

for tool in kubeadm kubelet kubectl crictl runc containerd containerd-shim-runc-v2 ctr; do
  if [ ! -f "$disk/bin/$tool" ]; then
    echo "corekube: $disk/bin/$tool is missing from the image disk (rebuild it: make disk)" >&2
    exit 1
  fi
  install -m 0755 "$disk/bin/$tool" "$bin/$tool"
done
# Other containerd helpers the release tarball may carry (containerd-stress…).
for extra in "$disk"/bin/containerd-*; do
  [ -f "$extra" ] && install -m 0755 "$extra" "$bin/$(basename "$extra")"
done
for plugin in "$disk"/cni/*; do
  [ -f "$plugin" ] && [ -x "$plugin" ] && install -m 0755 "$plugin" "$cni/$(basename "$plugin")"
done

# SELinux (FCOS runs enforcing): label the copies as the policy means them to be.
# /usr/local is /var/usrlocal on FCOS, which the policy aliases to /usr/local
# (file_contexts.subs_dist), so restorecon gives kubelet kubelet_exec_t and containerd,
# its shim and runc container_runtime_exec_t (container-selinux's container.fc).
# /opt is /var/opt on FCOS with no such alias: restorecon would leave var_t, so the CNI
# plugins get bin_t explicitly, what the policy gives /opt/*/bin on a Fedora with a real /opt.
if [ -z "$root" ] && command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled; then
  restorecon -R /usr/local/bin
  chcon -R -t bin_t "$cni"
  echo "corekube: SELinux labels: $(stat -c %C /usr/local/bin/kubelet) on kubelet, $(stat -c %C "$cni") on $cni"
fi
echo "corekube: installed $(find "$bin" -type f | wc -l) binaries and $(find "$cni" -type f | wc -l) CNI plugins"
