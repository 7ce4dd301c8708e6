// Optional CUDA extension: classify (query tile, key tile) pairs of token tags as
// skip / full / partial in one kernel, instead of the several torch ops of the
// fallback in kernels/tiles.py. Same rules:
//   skip iff OR(q tile tags) & OR(k tile tags) == 0
//   full iff AND(q tile tags) & AND(k tile tags) != 0, and the key tile has no padding.
// Built only with IIDKERN_BUILD_CUDA=1 (see setup.py); loaded by iidkern/_ext.py.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace {

// One thread per (batch, tile): OR over the tile's tokens, AND over its real tokens.
__global__ void tile_reduce(const int64_t* tags, int64_t n, int64_t block, int64_t n_tiles,
                            int64_t* tile_or, int64_t* tile_and, int64_t batch) {
  int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= batch * n_tiles) return;
  int64_t b = idx / n_tiles, t = idx % n_tiles;
  int64_t lo = t * block, hi = min(lo + block, n);
  int64_t acc_or = 0, acc_and = ~0LL;
  for (int64_t i = lo; i < hi; ++i) {
    int64_t v = tags[b * n + i];
    acc_or |= v;
    acc_and &= v;
  }
  tile_or[idx] = acc_or;
  tile_and[idx] = acc_and;
}

__global__ void tile_classify(const int64_t* q_or, const int64_t* q_and, const int64_t* k_or,
                              const int64_t* k_and, int64_t batch, int64_t mt, int64_t nt,
                              bool last_k_ragged, bool* skip, bool* full) {
  int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= batch * mt * nt) return;
  int64_t j = idx % nt, i = (idx / nt) % mt, b = idx / (nt * mt);
  skip[idx] = (q_or[b * mt + i] & k_or[b * nt + j]) == 0;
  full[idx] = (q_and[b * mt + i] & k_and[b * nt + j]) != 0 && !(last_k_ragged && j == nt - 1);
}

}  // namespace

std::vector<torch::Tensor> classify_tiles(torch::Tensor q_tags, torch::Tensor k_tags, int64_t block_m,
                                          int64_t block_n) {
  TORCH_CHECK(q_tags.is_cuda() && k_tags.is_cuda(), "classify_tiles: tags must be CUDA tensors");
  TORCH_CHECK(q_tags.dim() == 2 && k_tags.dim() == 2, "classify_tiles: tags must be [B, N]");
  TORCH_CHECK(q_tags.device() == k_tags.device(), "classify_tiles: q_tags and k_tags must be on one GPU");
  // The tags' GPU, not the current one: the launches and the stream below are that device's.
  const c10::cuda::CUDAGuard guard(q_tags.device());
  auto q = q_tags.to(torch::kInt64).contiguous();
  auto k = k_tags.to(torch::kInt64).contiguous();
  int64_t batch = q.size(0), nq = q.size(1), nk = k.size(1);
  int64_t mt = (nq + block_m - 1) / block_m, nt = (nk + block_n - 1) / block_n;
  auto opts = q.options();
  auto q_or = torch::empty({batch, mt}, opts), q_and = torch::empty({batch, mt}, opts);
  auto k_or = torch::empty({batch, nt}, opts), k_and = torch::empty({batch, nt}, opts);
  auto skip = torch::empty({batch, mt, nt}, opts.dtype(torch::kBool));
  auto full = torch::empty({batch, mt, nt}, opts.dtype(torch::kBool));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  tile_reduce<<<(batch * mt + threads - 1) / threads, threads, 0, stream>>>(
      q.data_ptr<int64_t>(), nq, block_m, mt, q_or.data_ptr<int64_t>(), q_and.data_ptr<int64_t>(), batch);
  tile_reduce<<<(batch * nt + threads - 1) / threads, threads, 0, stream>>>(
      k.data_ptr<int64_t>(), nk, block_n, nt, k_or.data_ptr<int64_t>(), k_and.data_ptr<int64_t>(), batch);
  tile_classify<<<(batch * mt * nt + threads - 1) / threads, threads, 0, stream>>>(
      q_or.data_ptr<int64_t>(), q_and.data_ptr<int64_t>(), k_or.data_ptr<int64_t>(), k_and.data_ptr<int64_t>(),
      batch, mt, nt, nk % block_n != 0, skip.data_ptr<bool>(), full.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {skip, full};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("classify_tiles", &classify_tiles, "Classify tag tiles as skip/full (CUDA)");
}
