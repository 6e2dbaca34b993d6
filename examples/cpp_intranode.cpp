// moelink from C++ alone (no PyTorch): R ranks as forked processes on the visible GPUs exchange
// their IPC handles through files, then run layout -> notify -> dispatch -> combine on cudaMalloc'd
// memory and check the results exactly against a host reference.
//
//   cpp_intranode [num_ranks=2] [num_tokens=256] [hidden=1024]
//
// Combine is fed the dispatched rows themselves, so token t comes back as (ranks it was sent to) x
// x[t]: a sum of equal bf16 values in fp32, rounded once, which the host reproduces bit for bit.
#include <cuda_runtime_api.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moelink/buffer.hpp"
#include "moelink/error.hpp"

namespace {

#define CHECK_CUDA(expr)                                                                    \
  do {                                                                                      \
    const cudaError_t status_ = (expr);                                                     \
    if (status_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(status_));          \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fff + ((bits >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Routing {
  std::vector<uint16_t> x;       // [T, H] bf16
  std::vector<int64_t> topk_idx;  // [T, K], -1 = none
};

// Every rank can rebuild every rank's inputs from the seed, so the reference needs no exchange.
Routing make_routing(int rank, int T, int H, int K, int E) {
  std::mt19937 rng(1234 + rank);
  Routing r;
  r.x.resize(static_cast<size_t>(T) * H);
  std::uniform_real_distribution<float> value(-2.f, 2.f);
  for (auto& v : r.x) v = to_bf16(value(rng));
  r.topk_idx.resize(static_cast<size_t>(T) * K);
  std::vector<int> experts(E);
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) experts[e] = e;
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int k = 0; k < K; ++k) r.topk_idx[static_cast<size_t>(t) * K + k] = rng() % 5 == 0 ? -1 : experts[k];
  }
  return r;
}

template <class T>
T* to_device(const std::vector<T>& host) {
  T* ptr = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(host.size(), 1) * sizeof(T)));
  if (!host.empty()) CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return ptr;
}

template <class T>
std::vector<T> to_host(const T* ptr, size_t n) {
  std::vector<T> host(n);
  if (n) CHECK_CUDA(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

template <class T>
T* device_alloc(size_t n) {
  T* ptr = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(T)));
  return ptr;
}

moelink::TensorRef ref(void* data, moelink::DType dtype, std::vector<int64_t> shape, int device) {
  moelink::TensorRef t;
  t.data = data;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.device = device;
  return t;
}

int fail(int rank, const std::string& what) {
  std::fprintf(stderr, "rank %d: FAIL: %s\n", rank, what.c_str());
  return 1;
}

int run_rank(int rank, int R, int T, int H, const std::string& dir) {
  using moelink::DType;
  int num_devices = 0;
  CHECK_CUDA(cudaGetDeviceCount(&num_devices));
  const int device = rank % num_devices;
  CHECK_CUDA(cudaSetDevice(device));
  const int K = 4, E = 4 * R, experts_per_rank = E / R;

  const moelink::Config config = moelink::default_dispatch_config(R, 8);
  moelink::BufferOptions options;
  options.rank = rank;
  options.num_ranks = R;
  options.num_nvl_bytes = config.get_nvl_buffer_size_hint(static_cast<int64_t>(H) * 2, R);
  options.explicitly_destroy = true;
  moelink::Buffer buffer(options);

  // Bootstrap through files: write ours (atomically), wait for everyone's.
  const auto handle = buffer.local_ipc_handle();
  {
    const std::string tmp = dir + "/tmp" + std::to_string(rank), path = dir + "/handle" + std::to_string(rank);
    std::ofstream(tmp, std::ios::binary).write(reinterpret_cast<const char*>(handle.data()), handle.size());
    std::rename(tmp.c_str(), path.c_str());
  }
  std::vector<std::vector<uint8_t>> handles(R);
  std::vector<int> device_ids(R);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (int p = 0; p < R; ++p) {
    const std::string path = dir + "/handle" + std::to_string(p);
    for (;;) {
      std::ifstream in(path, std::ios::binary);
      if (in) {
        handles[p].assign(std::istreambuf_iterator<char>(in), {});
        if (handles[p].size() == handle.size()) break;
      }
      if (std::chrono::steady_clock::now() > deadline) return fail(rank, "rank " + std::to_string(p) + " never wrote its handle");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    device_ids[p] = p % num_devices;
  }
  buffer.sync(device_ids, handles, {});

  const Routing mine = make_routing(rank, T, H, K, E);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  moelink::StreamOrder order;
  order.compute_stream = stream;

  auto* x = to_device(mine.x);
  auto* topk_idx = to_device(mine.topk_idx);
  auto* num_tokens_per_rank = device_alloc<int>(R);
  auto* num_tokens_per_expert = device_alloc<int>(E);
  auto* is_token_in_rank = device_alloc<bool>(static_cast<size_t>(T) * R);
  moelink::LayoutOutputs layout;
  layout.num_tokens_per_rank = ref(num_tokens_per_rank, DType::kInt32, {R}, device);
  layout.num_tokens_per_expert = ref(num_tokens_per_expert, DType::kInt32, {E}, device);
  layout.is_token_in_rank = ref(is_token_in_rank, DType::kBool, {T, R}, device);
  buffer.get_dispatch_layout(ref(topk_idx, DType::kInt64, {T, K}, device), E, layout, order);

  const int C = config.num_channels();
  moelink::DispatchInputs in;
  in.x = ref(x, DType::kBFloat16, {T, H}, device);
  in.topk_idx = ref(topk_idx, DType::kInt64, {T, K}, device);
  in.is_token_in_rank = layout.is_token_in_rank;
  in.num_tokens_per_rank = layout.num_tokens_per_rank;
  in.num_tokens_per_expert = layout.num_tokens_per_expert;
  in.num_experts = E;
  moelink::DispatchHandle h;
  h.rank_prefix_matrix = ref(device_alloc<int>(R * R), DType::kInt32, {R, R}, device);
  h.channel_prefix_matrix = ref(device_alloc<int>(R * C), DType::kInt32, {R, C}, device);
  h.recv_channel_prefix_matrix = ref(device_alloc<int>(R * C), DType::kInt32, {R, C}, device);
  // The dispatch writes its id and status here; combine checks them on the device.
  h.info = ref(device_alloc<int64_t>(2), DType::kInt64, {2}, device);
  h.is_token_in_rank = layout.is_token_in_rank;
  const moelink::DispatchPlan plan = buffer.intranode_notify(in, h, config, order);
  const int N = plan.num_recv_tokens;

  // Host reference: rows arrive ordered by source rank, then source token.
  std::vector<uint16_t> expected_rows;
  std::vector<int> expected_src;
  for (int s = 0; s < R; ++s) {
    const Routing theirs = make_routing(s, T, H, K, E);
    for (int t = 0; t < T; ++t) {
      bool routed = false;
      for (int k = 0; k < K; ++k) {
        const int64_t e = theirs.topk_idx[static_cast<size_t>(t) * K + k];
        routed |= e >= 0 && e / experts_per_rank == rank;
      }
      if (!routed) continue;
      expected_src.push_back(t);
      expected_rows.insert(expected_rows.end(), theirs.x.begin() + static_cast<size_t>(t) * H,
                           theirs.x.begin() + static_cast<size_t>(t + 1) * H);
    }
  }
  if (N != static_cast<int>(expected_src.size()))
    return fail(rank, "received " + std::to_string(N) + " rows, expected " + std::to_string(expected_src.size()));

  auto* recv_x = device_alloc<uint16_t>(static_cast<size_t>(N) * H);
  CHECK_CUDA(cudaMemset(recv_x, 0xff, static_cast<size_t>(N) * H * 2));  // poison
  h.recv_src_idx = ref(device_alloc<int>(N), DType::kInt32, {N}, device);
  moelink::DispatchOutputs out;
  out.recv_x = ref(recv_x, DType::kBFloat16, {N, H}, device);
  out.recv_topk_idx = ref(device_alloc<int64_t>(static_cast<size_t>(N) * K), DType::kInt64, {N, K}, device);
  buffer.intranode_dispatch(in, h, out, config, order, false);

  moelink::CombineInputs cin;
  cin.x = out.recv_x;
  moelink::CombineOutputs cout;
  auto* combined = device_alloc<uint16_t>(static_cast<size_t>(T) * H);
  cout.combined_x = ref(combined, DType::kBFloat16, {T, H}, device);
  buffer.intranode_combine(cin, h, cout, moelink::default_combine_config(R, 8), order);
  CHECK_CUDA(cudaStreamSynchronize(stream));

  // Check everything, but reach destroy() on every rank either way: it is collective, and a rank
  // that left early would keep its peers in the destroy barrier until the timeout.
  std::string problem;
  if (to_host(recv_x, static_cast<size_t>(N) * H) != expected_rows) problem = "recv_x differs from the reference";
  if (problem.empty() && to_host(static_cast<int*>(h.recv_src_idx.data), N) != expected_src)
    problem = "recv_src_idx differs from the reference";
  const auto got = to_host(combined, static_cast<size_t>(T) * H);
  const auto in_rank = to_host(reinterpret_cast<const uint8_t*>(is_token_in_rank), static_cast<size_t>(T) * R);
  for (int t = 0; t < T && problem.empty(); ++t) {
    int copies = 0;
    for (int d = 0; d < R; ++d) copies += in_rank[static_cast<size_t>(t) * R + d];
    for (int i = 0; i < H && problem.empty(); ++i) {
      const size_t at = static_cast<size_t>(t) * H + i;
      // A token routed nowhere sums nothing: +0, never 0 * (negative x) = -0.
      const float want = copies ? copies * from_bf16(mine.x[at]) : 0.f;
      if (got[at] != to_bf16(want))
        problem = "combined_x differs at token " + std::to_string(t) + ", element " + std::to_string(i);
    }
  }
  buffer.destroy();
  if (!problem.empty()) return fail(rank, problem);
  std::printf("rank %d: %d rows received, dispatch and combine match the reference\n", rank, N);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int R = argc > 1 ? std::atoi(argv[1]) : 2;
  const int T = argc > 2 ? std::atoi(argv[2]) : 256;
  const int H = argc > 3 ? std::atoi(argv[3]) : 1024;
  if (R < 1 || R > 8 || T < 0 || H <= 0 || H % 8 != 0) {
    std::fprintf(stderr, "usage: cpp_intranode [num_ranks 1..8] [num_tokens >= 0] [hidden, multiple of 8]\n");
    return 2;
  }
  char dir_template[] = "/tmp/moelink-cpp-XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  std::vector<pid_t> children;
  for (int rank = 0; rank < R; ++rank) {
    const pid_t pid = fork();
    if (pid == 0) {
      try {
        std::_Exit(run_rank(rank, R, T, H, dir));
      } catch (const moelink::Error& e) {
        std::fprintf(stderr, "rank %d: moelink error: %s\n", rank, e.what());
        std::_Exit(1);
      }
    }
    children.push_back(pid);
  }
  int failures = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  for (size_t done = 0; done < children.size();) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      ++done;
      failures += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    } else if (std::chrono::steady_clock::now() > deadline) {
      for (pid_t child : children) kill(child, SIGKILL);
      std::fprintf(stderr, "timed out after 120 s\n");
      return 1;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  std::printf("cpp_intranode %d ranks: %s\n", R, failures ? "FAIL" : "PASS");
  return failures ? 1 : 0;
}
