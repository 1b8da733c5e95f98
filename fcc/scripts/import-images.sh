#!/bin/bash
# corekube-images.service: imports the OCI layout from the image disk into containerd's
# k8s.io namespace, every image under the names in the layout's index.json (name:tag and
# name@sha256:…), then labels each pinned so the kubelet's image garbage collection never
# removes one: offline, a removed image cannot come back.
set -euo pipefail

disk=${COREKUBE_DISK:-/var/mnt/corekube}
ctr=${COREKUBE_CTR:-/usr/local/bin/ctr}
address=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
export CONTAINERD_ADDRESS=$address

for _ in $(seq 1 60); do
  "$ctr" version >/dev/null 2>&1 && break
  sleep 1
done
"$ctr" version >/dev/null

layout="$disk/images"
if [ ! -f "$layout/index.json" ]; then
  echo "corekube: no image layout at $layout (rebuild the image disk: make disk)" >&2
  exit 1
fi

# ctr reads the layout as a tar stream on stdin: no copy on the node's disk.
tar -C "$layout" -cf - oci-layout index.json blobs | "$ctr" -n k8s.io images import -

count=0
while read -r name; do
  [ -n "$name" ] || continue
  "$ctr" -n k8s.io images label "$name" io.cri-containerd.pinned=pinned >/dev/null
  count=$((count + 1))
done < <("$ctr" -n k8s.io images ls -q)
echo "corekube: imported and pinned $count image names"
