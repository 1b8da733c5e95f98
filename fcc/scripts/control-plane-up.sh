#!/bin/bash
# corekube-control-plane.service: kubeadm init with the cluster CA made at build time
# (kubeadm makes every other certificate now, so none is ever expired), then the CNI's
# configuration and every manifest from the image disk. Idempotent: a restart of the
# unit on a node that is already up changes nothing.
set -euo pipefail

disk=${COREKUBE_DISK:-/var/mnt/corekube}
admin=/etc/kubernetes/admin.conf
kubectl=(/usr/local/bin/kubectl --kubeconfig "$admin")

if [ ! -f "$admin" ]; then
  /usr/local/bin/kubeadm init --config /etc/corekube/kubeadm.yaml --skip-token-print
fi

for _ in $(seq 1 120); do
  "${kubectl[@]}" get --raw /readyz >/dev/null 2>&1 && break
  sleep 2
done
"${kubectl[@]}" get --raw /readyz >/dev/null

# The CNI's configuration (generated from cluster.yaml, in its namespace) before the CNI
# itself, then manifests/ in order.
"${kubectl[@]}" create namespace kube-flannel --dry-run=client -o yaml | "${kubectl[@]}" apply -f -
"${kubectl[@]}" apply -f /etc/corekube/manifests/
if compgen -G "$disk/manifests/*.yaml" >/dev/null; then
  for manifest in "$disk"/manifests/*.yaml; do
    "${kubectl[@]}" apply -f "$manifest"
  done
fi
echo "corekube: control plane up"
