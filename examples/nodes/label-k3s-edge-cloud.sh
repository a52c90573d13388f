#!/usr/bin/env bash
# Describe the nodes of a K3s cluster to llmpipe: two edge boards and two cloud GPU nodes.
# Replace the node names with yours (`kubectl get nodes`) and the figures with your hardware's
# (see README.md next to this file for how to measure them). Re-running is safe (--overwrite).
#
# The same cluster as a file for `llmpipe plan` (what-if planning without a cluster):
# k3s-edge-cloud.cluster.yaml.
set -euo pipefail

label() { kubectl label node "$1" --overwrite "${@:2}"; }

# Tier: edge nodes may host stage 0 when a pipeline asks for firstStage: edge.
# tflops: effective dense fp16 TFLOP/s; memory-bandwidth-gbps: GB/s; uplink-mbps: Mbit/s.
label jetson-1 llmpipe.io/tier=edge  llmpipe.io/tflops=2.5 \
  llmpipe.io/memory-bandwidth-gbps=68  llmpipe.io/uplink-mbps=100
label jetson-2 llmpipe.io/tier=edge  llmpipe.io/tflops=5 \
  llmpipe.io/memory-bandwidth-gbps=102 llmpipe.io/uplink-mbps=100
label gpu-1    llmpipe.io/tier=cloud llmpipe.io/tflops=60 \
  llmpipe.io/memory-bandwidth-gbps=300 llmpipe.io/uplink-mbps=10000
label gpu-2    llmpipe.io/tier=cloud llmpipe.io/tflops=60 \
  llmpipe.io/memory-bandwidth-gbps=300 llmpipe.io/uplink-mbps=10000

# GPUs: nothing to label. On gpu-1 and gpu-2 NVIDIA GPU Feature Discovery (the GPU Operator,
# or the device plugin's chart with gfd.enabled) writes nvidia.com/gpu.count, .memory and
# .product, and the device plugin advertises nvidia.com/gpu; llmpipe plans a stage there on
# the GPU's memory. Check: kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.memory

# Links: measured bandwidth and round-trip time to particular peers, where they differ from
# min(uplink of both ends) and the tier-pair default RTT. JSON on one end is enough: links are
# symmetric.
kubectl annotate node jetson-1 --overwrite \
  'llmpipe.io/links={"jetson-2": {"mbps": 940, "rttMs": 0.4}, "gpu-1": {"mbps": 40, "rttMs": 35}}'
kubectl annotate node jetson-2 --overwrite \
  'llmpipe.io/links={"gpu-1": {"mbps": 80, "rttMs": 28}}'
kubectl annotate node gpu-1 --overwrite \
  'llmpipe.io/links={"gpu-2": {"mbps": 9400, "rttMs": 0.3}}'

kubectl get nodes -L llmpipe.io/tier,llmpipe.io/tflops,llmpipe.io/memory-bandwidth-gbps,llmpipe.io/uplink-mbps
