#!/bin/bash
# corekube-control-plane.service: kubeadm init with the cluster CA made at build time
# (kubeadm makes every other certificate now, so none is ever expired), then the CNI's
# configuration and every manifest from the image disk. Idempotent: a restart of the
# unit on a node that is already up changes nothing.
#
# One try per run; systemd runs it again when it fails (Restart=on-failure in the unit).
# kubeadm init counts as done only once it returned 0 (a marker under /var/lib/corekube):
# kubeadm writes admin.conf early, long before the bootstrap token, kube-proxy and CoreDNS.
# A try that started kubeadm init and did not see it finish is undone with kubeadm reset,
# which empties /etc/kubernetes/pki: the CA Ignition wrote is kept aside first and put
# back before kubeadm init runs again.
set -euo pipefail

disk=${COREKUBE_DISK:-/var/mnt/corekube}
state=/var/lib/corekube
pki=/etc/kubernetes/pki
kept=$state/cluster-ca
admin=/etc/kubernetes/admin.conf
kubectl=(/usr/local/bin/kubectl --kubeconfig "$admin")

if [ ! -f "$state/kubeadm-init.done" ]; then
  mkdir -p "$state"
  if [ ! -f "$kept/ca.key" ]; then
    if [ ! -f "$pki/ca.crt" ] || [ ! -f "$pki/ca.key" ]; then
      echo "corekube: the cluster CA is missing from $pki (Ignition writes ca.crt and ca.key there from out/pki; rebuild the configs: make ignition boot)" >&2
      exit 1
    fi
    install -d -m 0700 "$kept"
    cp -p "$pki/ca.crt" "$pki/ca.key" "$kept/"
  fi
  if [ -f "$state/kubeadm-init.started" ]; then
    echo "corekube: an earlier kubeadm init on this node did not finish: kubeadm reset, then kubeadm init again"
    /usr/local/bin/kubeadm reset --force
    # reset empties the etcd data directory only through the etcd manifest it finds;
    # kubeadm init's preflight refuses a non-empty one.
    if [ -d /var/lib/etcd ]; then find /var/lib/etcd -mindepth 1 -delete; fi
  fi
  install -d -m 0755 "$pki"
  cp -p "$kept/ca.crt" "$kept/ca.key" "$pki/"
  touch "$state/kubeadm-init.started"
  if ! /usr/local/bin/kubeadm init --config /etc/corekube/kubeadm.yaml --skip-token-print; then
    echo "corekube: kubeadm init failed (its own message is above); systemd tries again, three tries in all, each after kubeadm reset" >&2
    exit 1
  fi
  touch "$state/kubeadm-init.done"
fi

# The API server answers /readyz within 4 minutes of a successful init (a bound the unit's
# TimeoutStartSec counts on).
deadline=$((SECONDS + 240))
until "${kubectl[@]}" get --raw /readyz --request-timeout=10s >/dev/null 2>&1 || [ "$SECONDS" -ge "$deadline" ]; do
  sleep 2
done
"${kubectl[@]}" get --raw /readyz --request-timeout=10s >/dev/null

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
