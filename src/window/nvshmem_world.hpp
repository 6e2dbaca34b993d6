#pragma once
// The process's one NVSHMEM world, as the Buffers in it see it. NVSHMEM is a per-process singleton,
// and its init is a job-wide collective whose first PE asks the MPS control daemon twice and exits
// the process when the second is refused (bench/NOTES.md, fourteenth session): several jobs on one
// host race for it. So a process joins one world, named by its root's unique id, and every Buffer
// over that world's ranks (a low-latency Buffer, an internode Buffer's lanes) shares it; the world
// is finalised when its last Buffer leaves.
#include <cstdint>
#include <string>
#include <vector>

#include "moelink/error.hpp"

namespace moelink::window {

class NvshmemWorld {
 public:
  // What a join with these arguments does: enter a world not yet joined (the caller runs NVSHMEM's
  // init), or share the one joined already. Raises kState when the process is in another world,
  // or in this one as another PE: two worlds cannot coexist in one process.
  enum class Join { kInit, kShare };
  Join admit(int pe, int num_pes, const std::vector<uint8_t>& id) const {
    if (lost_)
      throw Error(ErrorKind::kState, "moelink: this process's NVSHMEM world lost pe " + std::to_string(lost_pe_) +
                                         "; NVSHMEM cannot be entered again in this process: restart it");
    if (members_ == 0) return Join::kInit;
    if (id != id_)
      throw Error(ErrorKind::kState, "moelink: this process is in an NVSHMEM world already (pe " + std::to_string(pe_) +
                                         " of " + std::to_string(num_pes_) + ") and cannot join another one; a Buffer "
                                         "shares the world only when it spans the same ranks (pass that world's id, "
                                         "nvshmem_world())");
    if (pe != pe_ || num_pes != num_pes_)
      throw Error(ErrorKind::kState, "moelink: this process is pe " + std::to_string(pe_) + " of " +
                                         std::to_string(num_pes_) + " in its NVSHMEM world; a Buffer sharing it "
                                         "asked to be pe " + std::to_string(pe) + " of " + std::to_string(num_pes));
    return Join::kShare;
  }
  void joined(int pe, int num_pes, const std::vector<uint8_t>& id) {
    if (members_++ == 0) {
      id_ = id;
      pe_ = pe;
      num_pes_ = num_pes;
    }
  }
  // Whether the caller must finalise NVSHMEM now (the last member left a world that lost no PE).
  bool left() {
    if (members_ == 0) throw Error(ErrorKind::kState, "moelink: nvshmem_leave without a join");
    if (--members_ > 0 || lost_) return false;
    id_.clear();
    pe_ = -1;
    num_pes_ = 0;
    return true;
  }
  // The world lost `pe` (its bounded barrier timed out on it): every member leaves without
  // NVSHMEM's collectives, and no Buffer of this process joins one again.
  // pe < 0: not known which (this PE's own CUDA calls failed).
  void lose(int pe) {
    if (!lost_) lost_pe_ = pe;
    lost_ = true;
  }
  bool lost() const { return lost_; }
  int lost_pe() const { return lost_pe_; }
  int members() const { return members_; }
  const std::vector<uint8_t>& id() const { return id_; }  // empty when not joined
  int pe() const { return pe_; }
  int num_pes() const { return num_pes_; }

 private:
  std::vector<uint8_t> id_;
  int pe_ = -1;
  int num_pes_ = 0;
  int members_ = 0;
  int lost_pe_ = -1;
  bool lost_ = false;
};

}  // namespace moelink::window
