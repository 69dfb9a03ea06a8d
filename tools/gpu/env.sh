# Sourced by tools/gpu/run.sh and tools/gpu/owed.sh on the GPU machine, with P set to the unpacked
# pack (tools/gpu/pack.sh): the libraries the packed binaries load (the machine's torch venv has
# cuDNN, NCCL, cuBLAS and the CUDA runtime; the pack the rest), where the test binaries find the
# fixtures and the packed moeforge (their compiled-in paths are this machine's checkout and build),
# and the NCCL settings of the lent machines. Run from the repository root.
V=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$V/cudnn/lib:$V/nccl/lib:$V/cublas/lib:$V/cu13/lib:$P/lib:${LD_LIBRARY_PATH:-}
export MOEFORGE_FIXTURES_DIR=$PWD/tests/fixtures MOEFORGE_BIN_PATH=$P/bin/moeforge
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on the shared machines
