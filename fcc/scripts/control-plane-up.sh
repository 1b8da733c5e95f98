#!/bin/bash
# corekube-control-plane.service: brings this control plane up, then the CNI's
# configuration and every manifest from the image disk. Idempotent: a restart of the unit
# on a node that is already up changes nothing.
#
# One control plane: kubeadm init with the cluster CA made at build time (kubeadm makes
# every other certificate now, so none is ever expired).
#
# Three control planes (/etc/corekube/control-plane.env, COREKUBE_VIRTUAL_IP=yes): every
# boot is a first boot, so this node is blank whatever the others are.
#   - If an API server of this cluster answers (the virtual IP, or any other control
#     plane, checked against the cluster CA), the cluster exists: this node joins it with
#     `kubeadm join --control-plane` (the shared CAs and keys are already in
#     /etc/kubernetes/pki from Ignition). Its etcd member from before the reboot is still
#     in the cluster, under the same peer URL; kubeadm would skip adding it (addMember in
#     cmd/kubeadm/app/util/etcd/etcd.go returns early when the peer URL exists) and start a
#     blank etcd under the old member's ID, which the leader's log no longer fits. So the
#     stale member is removed first, through a healthy member's client port.
#   - Else the first control plane in cluster.yaml (COREKUBE_INITIALIZER) runs kubeadm
#     init, after a short look for a cluster; the others wait for one to exist.
# The virtual IP (kube-vip) goes in as a static pod before kubeadm runs: with
# super-admin.conf for init (admin.conf has no rights before init binds its group), with
# admin.conf for a join and, once init is done, on the initializer too.
#
# One try per run; systemd runs it again when it fails (Restart=on-failure in the unit).
# kubeadm init counts as done only once it returned 0 (a marker under /var/lib/corekube):
# kubeadm writes admin.conf early, long before the bootstrap token, kube-proxy and CoreDNS.
# A try that started kubeadm init and did not see it finish is undone with kubeadm reset,
# which empties /etc/kubernetes/pki: what Ignition wrote there (the cluster CA, and with
# three control planes the shared CAs and keys) is kept aside first and put back before
# kubeadm runs again.
set -euo pipefail

disk=${COREKUBE_DISK:-/var/mnt/corekube}
etc=${COREKUBE_ETC:-/etc/corekube}
pki=${COREKUBE_PKI:-/etc/kubernetes/pki}
manifests=${COREKUBE_STATIC_PODS:-/etc/kubernetes/manifests}
state=${COREKUBE_STATE:-/var/lib/corekube}
kept=$state/ignition-pki
admin=/etc/kubernetes/admin.conf
kubectl=(/usr/local/bin/kubectl --kubeconfig "$admin")
# How long the initializer looks for an existing cluster before it makes a new one.
look=${COREKUBE_LOOK_SECONDS:-30}
# kubeadm's ports (the tests reach their own servers elsewhere).
api_port=${COREKUBE_API_PORT:-6443}
etcd_port=${COREKUBE_ETCD_PORT:-2379}

log() { echo "corekube: $*" >&2; }

# Does an API server of this cluster answer at ADDRESS? TLS checked against the cluster
# CA; any HTTP answer counts (/livez may be refused to anonymous users).
api_answers() {
  curl --silent --output /dev/null --max-time 5 --cacert "$pki/ca.crt" "https://$1:$api_port/livez"
}

# The other control planes' addresses, from COREKUBE_CONTROL_PLANES ("name=ip ...").
peer_ips() {
  local entry
  for entry in $COREKUBE_CONTROL_PLANES; do
    [ "${entry%%=*}" = "$COREKUBE_NODE_NAME" ] || echo "${entry#*=}"
  done
}

# The first address where this cluster's API server answers: the virtual IP, then each peer.
live_api() {
  local address
  for address in "$COREKUBE_ENDPOINT" $(peer_ips); do
    if api_answers "$address"; then
      echo "$address"
      return 0
    fi
  done
  return 1
}

# The member ID (decimal) whose first peer URL is $2, in etcd's JSON member list $1 (the
# gRPC gateway's /v3/cluster/member/list answer: {"header":…,"members":[{"ID":"…",
# "name":"…","peerURLs":["…"],…},…]}); empty (and success) when there is none.
member_id_for() {
  printf '%s' "$1" | tr -d '\n' | sed 's/},{/}\n{/g' | { grep -F "\"peerURLs\":[\"$2\"" || true; } |
    sed -n 's/.*"ID":"\{0,1\}\([0-9][0-9]*\)"\{0,1\}.*/\1/p' | head -n 1
}

# etcd's gRPC gateway on a peer's client port, as kubeadm's own etcd client authenticates
# (the etcd CA and the healthcheck client certificate, cmd/kubeadm/app/util/etcd).
etcd_call() {
  curl --silent --show-error --fail --max-time 10 \
    --cacert "$pki/etcd/ca.crt" --cert "$pki/etcd/healthcheck-client.crt" --key "$pki/etcd/healthcheck-client.key" \
    -X POST --data "$2" "https://$1:$etcd_port/v3/cluster/member/$3"
}

# Removes this node's etcd member from before its reboot, through the first peer that
# answers. Nothing to do when there is none (a first join, or a member already gone).
remove_stale_member() {
  local peer list id peer_url="https://$COREKUBE_NODE_IP:2380"
  for peer in $(peer_ips); do
    list=$(etcd_call "$peer" '{}' list) || continue
    id=$(member_id_for "$list" "$peer_url")
    if [ -z "$id" ]; then
      log "etcd (through $peer) has no member at $peer_url: nothing stale to remove"
      return 0
    fi
    if etcd_call "$peer" "{\"ID\":\"$id\"}" remove >/dev/null; then
      log "removed the stale etcd member $id ($peer_url) through $peer"
      return 0
    fi
  done
  log "no healthy etcd member answered on any of: $(peer_ips | tr '\n' ' ')(etcd needs a quorum to remove a member)"
  return 1
}

# Keeps what Ignition wrote to $pki aside (once), for the retries after a kubeadm reset.
keep_ignition_pki() {
  if [ -d "$kept" ]; then return 0; fi
  if [ ! -f "$pki/ca.crt" ] || [ ! -f "$pki/ca.key" ]; then
    log "the cluster CA is missing from $pki (Ignition writes ca.crt and ca.key there from out/pki; rebuild the configs: make ignition boot)"
    exit 1
  fi
  mkdir -p "$state"
  cp -a "$pki" "$kept"
  chmod 0700 "$kept"
}

restore_ignition_pki() {
  rm -rf "$pki"
  cp -a "$kept" "$pki"
  chmod 0755 "$pki"
}

# kubeadm init, once: a try that started and did not finish is reset first (kubeadm
# init's preflight refuses the files, the manifests and the etcd data it left).
init_cluster() {
  if [ -f "$state/kubeadm-init.started" ]; then
    log "an earlier kubeadm init on this node did not finish: kubeadm reset, then kubeadm init again"
    /usr/local/bin/kubeadm reset --force
    # reset empties the etcd data directory only through the etcd manifest it finds.
    if [ -d /var/lib/etcd ]; then find /var/lib/etcd -mindepth 1 -delete; fi
    restore_ignition_pki
  fi
  touch "$state/kubeadm-init.started"
  if ! /usr/local/bin/kubeadm init --config "$etc/kubeadm.yaml" --skip-token-print; then
    log "kubeadm init failed (its own message is above); systemd tries again, three tries in all, each after kubeadm reset"
    exit 1
  fi
  touch "$state/kubeadm-init.done"
}

install_vip() {
  install -m 0644 "$etc/kube-vip/$1.yaml" "$manifests/kube-vip.yaml"
}

join_control_plane() {
  local attempt
  for attempt in $(seq 1 20); do
    install_vip join
    # This node's etcd client certificate (made from the etcd CA it holds, as the join
    # would make it), to reach a healthy member; then the join itself.
    if /usr/local/bin/kubeadm join phase control-plane-prepare certs --config "$etc/kubeadm-join.yaml" &&
      remove_stale_member &&
      /usr/local/bin/kubeadm join --config "$etc/kubeadm-join.yaml"; then
      touch "$state/kubeadm-join.done"
      log "joined the control planes"
      return 0
    fi
    log "join attempt $attempt failed; resetting and trying again"
    /usr/local/bin/kubeadm reset --force >/dev/null 2>&1 || true
    restore_ignition_pki
    sleep 10
  done
  log "could not join the other control planes"
  return 1
}

bring_up() {
  if [ -f "$state/kubeadm-init.done" ] || [ -f "$state/kubeadm-join.done" ]; then
    return 0
  fi
  keep_ignition_pki
  if [ "${COREKUBE_VIRTUAL_IP:-no}" != yes ]; then
    init_cluster
    return 0
  fi
  mkdir -p "$manifests"
  # A half-done init of this node's own would answer as "the cluster": undo it before looking.
  if [ -f "$state/kubeadm-init.started" ]; then
    log "an earlier kubeadm init on this node did not finish: kubeadm reset before looking for the cluster"
    /usr/local/bin/kubeadm reset --force
    if [ -d /var/lib/etcd ]; then find /var/lib/etcd -mindepth 1 -delete; fi
    restore_ignition_pki
    rm -f "$state/kubeadm-init.started"
  fi
  local found deadline
  if [ "$COREKUBE_NODE_NAME" = "$COREKUBE_INITIALIZER" ]; then
    deadline=$((SECONDS + look))
    while ! found=$(live_api) && [ "$SECONDS" -lt "$deadline" ]; do sleep 2; done
    if [ -z "${found:-}" ]; then
      log "no API server of this cluster answers at $COREKUBE_ENDPOINT or the other control planes: kubeadm init"
      install_vip init
      init_cluster
      return 0
    fi
  else
    until found=$(live_api); do sleep 5; done
  fi
  log "the cluster answers at $found: joining it"
  join_control_plane
}

main() {
  # shellcheck source=/dev/null
  [ -f "$etc/control-plane.env" ] && . "$etc/control-plane.env"
  bring_up

  # The API server answers /readyz within 4 minutes of a successful init or join (a bound
  # the unit's TimeoutStartSec counts on).
  local deadline=$((SECONDS + 240))
  until "${kubectl[@]}" get --raw /readyz --request-timeout=10s >/dev/null 2>&1 || [ "$SECONDS" -ge "$deadline" ]; do
    sleep 2
  done
  "${kubectl[@]}" get --raw /readyz --request-timeout=10s >/dev/null

  # After init, kube-vip leaves super-admin.conf (system:masters) for admin.conf, whose
  # group init has now bound to cluster-admin; the kubelet restarts it with the new file.
  if [ "${COREKUBE_VIRTUAL_IP:-no}" = yes ] && [ "$(cat "$etc/kube-vip/join.yaml")" != "$(cat "$manifests/kube-vip.yaml" 2>/dev/null)" ]; then
    install_vip join
  fi

  # The CNI's configuration (generated from cluster.yaml, in its namespace) before the CNI
  # itself, then manifests/ in order (every control plane: kubectl apply changes nothing twice).
  "${kubectl[@]}" create namespace kube-flannel --dry-run=client -o yaml | "${kubectl[@]}" apply -f -
  "${kubectl[@]}" apply -f "$etc/manifests/"
  if compgen -G "$disk/manifests/*.yaml" >/dev/null; then
    for manifest in "$disk"/manifests/*.yaml; do
      "${kubectl[@]}" apply -f "$manifest"
    done
  fi
  echo "corekube: control plane up"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
