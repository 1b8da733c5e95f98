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

# Every name the import made, and the image-ID references (sha256:…) that containerd's
# CRI plugin adds for them: all pinned, several labels at a time (each ctr call costs).
mapfile -t names < <("$ctr" -n k8s.io images ls -q)
if [ "${#names[@]}" -eq 0 ]; then
  echo "corekube: containerd lists no image after importing $layout (is the layout empty? rebuild it: make images disk)" >&2
  exit 1
fi
printf '%s\n' "${names[@]}" | xargs -r -P 4 -I '{}' "$ctr" -n k8s.io images label '{}' io.cri-containerd.pinned=pinned >/dev/null
layout_names=$(printf '%s\n' "${names[@]}" | grep -vc '^sha256:' || true)
echo "corekube: imported and pinned $layout_names image names ($(( ${#names[@]} - layout_names )) image-ID references too)"
