// Smoke test for src/window/nvshmem: N forked processes form one NVSHMEM job through the
// unique-id bootstrap, allocate from the symmetric heap, meet at a barrier, run the device-side
// self-test (a ring of stores to mapped peers and of put-with-signal), and leave.
//
// Protocol: PE 0 creates the unique id and publishes it by writing <dir>/uid.partial and renaming
// it to <dir>/uid (the rename is atomic, so a reader never sees a half-written id); every other PE
// polls for <dir>/uid for at most kIdWait. The parent touches no CUDA (it forks before any
// context exists), waits for all children for at most kJobWait, then kills the stragglers.
//
// usage: nvshmem_smoke <num_pes>   (PE i uses device i % device_count)
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

#include "moelink/error.hpp"
#include "window/nvshmem.hpp"

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kIdWait = std::chrono::seconds(30);
constexpr auto kJobWait = std::chrono::seconds(60);
constexpr int64_t kAllocBytes = int64_t{1} << 20;

namespace fs = std::filesystem;
namespace transport = moelink::window;

void check_cuda(cudaError_t status, const char* call, int pe) {
  if (status != cudaSuccess) {
    throw moelink::Error(moelink::ErrorKind::kCuda, std::string("moelink: ") + call + " failed with " +
                                                        cudaGetErrorString(status) + " (pe " +
                                                        std::to_string(pe) + ")");
  }
}

void publish_id(const fs::path& dir, const std::vector<uint8_t>& id) {
  const fs::path partial = dir / "uid.partial";
  {
    std::ofstream out(partial, std::ios::binary);
    out.write(reinterpret_cast<const char*>(id.data()), static_cast<std::streamsize>(id.size()));
    if (!out) throw std::runtime_error("cannot write " + partial.string());
  }
  fs::rename(partial, dir / "uid");
}

std::vector<uint8_t> await_id(const fs::path& dir, int pe) {
  const fs::path path = dir / "uid";
  const auto deadline = Clock::now() + kIdWait;
  while (!fs::exists(path)) {
    if (Clock::now() > deadline) {
      throw moelink::Error(moelink::ErrorKind::kTimeout,
                           "pe " + std::to_string(pe) + ": no unique id from pe 0 at " + path.string());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

template <typename Fn>
void expect_state_error(Fn&& fn, const char* what, int pe) {
  try {
    fn();
  } catch (const moelink::Error& error) {
    if (error.kind() == moelink::ErrorKind::kState) return;
    throw;
  }
  throw std::runtime_error("pe " + std::to_string(pe) + ": " + what + " did not raise kState");
}

void run_pe(int pe, int num_pes, const fs::path& dir) {
  if (!transport::nvshmem_compiled()) throw std::runtime_error("libmoelink was built without NVSHMEM");
  expect_state_error([] { transport::nvshmem_alloc(kAllocBytes); }, "nvshmem_alloc before join", pe);

  int device_count = 0;
  check_cuda(cudaGetDeviceCount(&device_count), "cudaGetDeviceCount", pe);
  check_cuda(cudaSetDevice(pe % device_count), "cudaSetDevice", pe);

  std::vector<uint8_t> id;
  if (pe == 0) {
    id = transport::nvshmem_unique_id();
    publish_id(dir, id);
  } else {
    id = await_id(dir, pe);
  }
  transport::nvshmem_join(pe, num_pes, id);
  // One world per process: a join with its id shares it (a second Buffer over the same ranks), one
  // with any other id, or as another PE, is refused.
  transport::nvshmem_join(pe, num_pes, id);
  std::vector<uint8_t> other = id;
  other[0] ^= 0xff;
  expect_state_error([&] { transport::nvshmem_join(pe, num_pes, other); }, "a join of another world", pe);
  expect_state_error([&] { transport::nvshmem_join((pe + 1) % num_pes, num_pes + 1, id); }, "a join as another PE", pe);
  const auto world = transport::nvshmem_world();
  if (world.id != id || world.pe != pe || world.num_pes != num_pes)
    throw std::runtime_error("pe " + std::to_string(pe) + ": nvshmem_world() does not name the world joined");
  transport::nvshmem_leave();  // the sharing member: the world stays

  void* buffer = transport::nvshmem_alloc(kAllocBytes);
  std::vector<uint8_t> host(kAllocBytes, 0xff);
  check_cuda(cudaMemcpy(host.data(), buffer, host.size(), cudaMemcpyDeviceToHost), "cudaMemcpy", pe);
  for (size_t i = 0; i < host.size(); ++i) {
    if (host[i] != 0) {
      throw std::runtime_error("pe " + std::to_string(pe) + ": byte " + std::to_string(i) + " not zeroed");
    }
  }
  transport::nvshmem_barrier_all();
  const bool mapped = transport::nvshmem_self_test();
  std::printf("pe %d: device self-test ok (%s)\n", pe, mapped ? "store to a mapped peer and put-with-signal"
                                                             : "put-with-signal; the next PE was not mapped");
  std::fflush(stdout);
  if (transport::nvshmem_world_barrier(10.0) != -1)
    throw std::runtime_error("pe " + std::to_string(pe) + ": the world's bounded barrier failed with every PE alive");
  transport::nvshmem_release(buffer);
  transport::nvshmem_leave();
  if (!transport::nvshmem_world().id.empty())
    throw std::runtime_error("pe " + std::to_string(pe) + ": the world outlived its last member");
  expect_state_error([] { transport::nvshmem_barrier_all(); }, "nvshmem_barrier_all after leave", pe);
}

int child_main(int pe, int num_pes, const fs::path& dir) {
  try {
    run_pe(pe, num_pes, dir);
    std::printf("pe %d: ok\n", pe);
    std::fflush(stdout);
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "pe %d: %s\n", pe, error.what());
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int num_pes = argc > 1 ? std::atoi(argv[1]) : 0;
  if (num_pes < 1) {
    std::fprintf(stderr, "usage: %s <num_pes>\n", argv[0]);
    return 2;
  }
  char dir_template[] = "/tmp/moelink_nvshmem_smoke.XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    std::perror("mkdtemp");
    return 2;
  }
  const fs::path dir(dir_template);

  std::fflush(stdout);
  std::vector<pid_t> children;
  for (int pe = 0; pe < num_pes; ++pe) {
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("fork");
      for (pid_t child : children) kill(child, SIGKILL);
      return 2;
    }
    if (pid == 0) std::exit(child_main(pe, num_pes, dir));
    children.push_back(pid);
  }

  std::vector<int> outcome(num_pes, -1);  // exit status, or -1 while still running
  int running = num_pes;
  const auto deadline = Clock::now() + kJobWait;
  while (running > 0 && Clock::now() < deadline) {
    for (int pe = 0; pe < num_pes; ++pe) {
      if (outcome[pe] != -1) continue;
      int status = 0;
      if (waitpid(children[pe], &status, WNOHANG) == children[pe]) {
        outcome[pe] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        --running;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  bool passed = true;
  for (int pe = 0; pe < num_pes; ++pe) {
    if (outcome[pe] == -1) {
      kill(children[pe], SIGKILL);
      waitpid(children[pe], nullptr, 0);
      std::fprintf(stderr, "pe %d: killed after %llds\n", pe, static_cast<long long>(kJobWait.count()));
      passed = false;
    } else if (outcome[pe] != 0) {
      std::fprintf(stderr, "pe %d: exited with %d\n", pe, outcome[pe]);
      passed = false;
    }
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);
  std::printf("nvshmem_smoke %d PEs: %s\n", num_pes, passed ? "PASS" : "FAIL");
  return passed ? 0 : 1;
}
