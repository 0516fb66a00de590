// Where this process stands in a multi-process job (no CUDA, no NCCL here): rank, world size and
// local rank read from the environment of the launcher that started it, and the file rendezvous
// through which rank 0 hands the NCCL unique id to the other ranks.
//
// Launchers recognised, first match wins:
//   1. explicit / torchrun style: RANK, WORLD_SIZE, LOCAL_RANK (LOCAL_WORLD_SIZE optional); this
//      is also what parallel::launch_local (launch.hpp) sets for its children;
//   2. Open MPI (mpirun): OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE;
//   3. MPICH / Intel MPI (mpiexec, Hydra): PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS;
//   4. Slurm job steps (srun): SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
//      SLURM_STEP_TASKS_PER_NODE (only inside an srun step: a batch script alone is one process);
//   otherwise a single process (rank 0 of 1).
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <initializer_list>
#include <string>
#include <thread>

#include "distilx/core/error.hpp"
#include "distilx/data/shards.hpp"  // data::detail::write_file_atomic

namespace distilx::parallel {

enum class Launcher { single, env, openmpi, pmi, slurm };

inline const char* to_string(Launcher l) {
  switch (l) {
    case Launcher::single: return "single process";
    case Launcher::env: return "RANK/WORLD_SIZE environment";
    case Launcher::openmpi: return "Open MPI (mpirun)";
    case Launcher::pmi: return "MPICH/Intel MPI (PMI)";
    case Launcher::slurm: return "Slurm (srun)";
  }
  return "?";
}

/// This process's place in the job.
struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;        ///< index among the ranks of this node: selects the GPU
  int local_world_size = 1;  ///< ranks on this node (-1 when the launcher does not say)
  Launcher launcher = Launcher::single;
  /// A key unique to this job (Slurm job.step, PMIx namespace, DISTILX_RUN_ID); empty if unknown.
  std::string job_key;

  bool distributed() const { return world_size > 1; }
  /// True when every rank runs on this node (the launcher says so).
  bool single_node() const { return local_world_size == world_size; }
  std::string describe() const {
    return detail::concat("rank ", rank, " of ", world_size, " (local rank ", local_rank, " of ",
                          local_world_size < 0 ? std::string("?") : std::to_string(local_world_size), ", ",
                          to_string(launcher), ")");
  }
};

namespace detail {

using ::distilx::detail::concat;

inline const char* getenv_nonempty(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

/// A whole decimal integer in [lo, hi] from variable `name`, or a config_error naming it.
inline int env_int(const char* name, const char* value, int lo, int hi) {
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  DISTILX_REQUIRE(config_error, errno == 0 && end != value && *end == '\0' && v >= lo && v <= hi,
                  "environment variable ", name, "='", value, "' is not an integer in [", lo, ", ", hi, "]");
  return static_cast<int>(v);
}

inline int env_int_or(const char* name, int fallback, int lo, int hi) {
  const char* v = getenv_nonempty(name);
  return v ? env_int(name, v, lo, hi) : fallback;
}

/// Slurm's "2(x3),1" task-per-node lists: the count of node `node` (0-based).
inline int slurm_tasks_on_node(const std::string& list, int node) {
  int seen = 0;
  std::size_t i = 0;
  while (i < list.size()) {
    std::size_t j = i;
    while (j < list.size() && std::isdigit(static_cast<unsigned char>(list[j]))) ++j;
    if (j == i) return -1;
    const int count = std::atoi(list.substr(i, j - i).c_str());
    int repeat = 1;
    if (j < list.size() && list[j] == '(') {
      const std::size_t close = list.find(')', j);
      if (close == std::string::npos || list[j + 1] != 'x') return -1;
      repeat = std::atoi(list.substr(j + 2, close - j - 2).c_str());
      j = close + 1;
    }
    if (node < seen + repeat) return count;
    seen += repeat;
    i = j < list.size() && list[j] == ',' ? j + 1 : j;
  }
  return -1;
}

}  // namespace detail

/// Reads the launcher's variables (see the file comment). Throws config_error naming the variable
/// when one is malformed or inconsistent (rank outside [0, world), local rank outside its node).
inline DistEnv detect_env() {
  using detail::env_int;
  using detail::getenv_nonempty;
  constexpr int kMax = 1 << 20;
  DistEnv e;
  if (const char* run = getenv_nonempty("DISTILX_RUN_ID")) e.job_key = run;
  // An MPI launcher (Open MPI, MPICH/Intel MPI's PMI): rank and size required, the local rank and
  // node size optional; the first job-key variable that is set names the job.
  auto mpi_like = [&](Launcher l, const char* rank, const char* size, const char* local_rank, const char* local_size,
                      std::initializer_list<const char*> job_keys) {
    if (!getenv_nonempty(rank) || !getenv_nonempty(size)) return false;
    e.launcher = l;
    e.world_size = env_int(size, std::getenv(size), 1, kMax);
    e.rank = env_int(rank, std::getenv(rank), 0, e.world_size - 1);
    e.local_rank = detail::env_int_or(local_rank, 0, 0, kMax);
    e.local_world_size = detail::env_int_or(local_size, -1, 1, kMax);
    for (const char* k : job_keys)
      if (e.job_key.empty())
        if (const char* v = getenv_nonempty(k)) e.job_key = v;
    return true;
  };
  if (getenv_nonempty("RANK") && getenv_nonempty("WORLD_SIZE")) {
    e.launcher = Launcher::env;
    e.world_size = env_int("WORLD_SIZE", std::getenv("WORLD_SIZE"), 1, kMax);
    e.rank = env_int("RANK", std::getenv("RANK"), 0, e.world_size - 1);
    const char* lr = getenv_nonempty("LOCAL_RANK");
    DISTILX_REQUIRE(config_error, lr || e.world_size == 1, "RANK and WORLD_SIZE are set but LOCAL_RANK is not: ",
                    "set LOCAL_RANK to the rank's index on its node (it selects the GPU)");
    e.local_rank = lr ? env_int("LOCAL_RANK", lr, 0, kMax) : 0;
    e.local_world_size = detail::env_int_or("LOCAL_WORLD_SIZE", -1, 1, kMax);
    if (e.job_key.empty())
      if (const char* t = getenv_nonempty("TORCHELASTIC_RUN_ID")) e.job_key = t;
  } else if (mpi_like(Launcher::openmpi, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                      "OMPI_COMM_WORLD_LOCAL_SIZE", {"PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"})) {
  } else if (mpi_like(Launcher::pmi, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", {"PMI_KVSNAME"})) {
  } else if (getenv_nonempty("SLURM_PROCID") && getenv_nonempty("SLURM_STEP_NUM_TASKS")) {
    e.launcher = Launcher::slurm;
    e.world_size = env_int("SLURM_STEP_NUM_TASKS", std::getenv("SLURM_STEP_NUM_TASKS"), 1, kMax);
    e.rank = env_int("SLURM_PROCID", std::getenv("SLURM_PROCID"), 0, e.world_size - 1);
    e.local_rank = detail::env_int_or("SLURM_LOCALID", 0, 0, kMax);
    e.local_world_size = -1;
    if (const char* tpn = getenv_nonempty("SLURM_STEP_TASKS_PER_NODE")) {
      const int node = detail::env_int_or("SLURM_NODEID", 0, 0, kMax);
      e.local_world_size = detail::slurm_tasks_on_node(tpn, node);
    }
    if (e.job_key.empty()) {
      const char* job = getenv_nonempty("SLURM_JOB_ID");
      const char* step = getenv_nonempty("SLURM_STEP_ID");
      if (job) e.job_key = detail::concat(job, ".", step ? step : "0");
    }
  }
  DISTILX_REQUIRE(config_error, e.local_world_size < 0 || e.local_rank < e.local_world_size, e.describe(),
                  ": the local rank is not below the number of ranks on the node");
  return e;
}

/// The rendezvous file for the NCCL unique id: DISTILX_NCCL_ID_FILE if set; otherwise, when the
/// launcher gives a job key, a file named after it in /tmp (all ranks on one node) or in
/// DISTILX_NCCL_ID_DIR / $HOME (several nodes: must be a file system every node sees). Throws
/// config_error when no unique name can be formed (two jobs must never share the file).
inline std::string id_file_path(const DistEnv& e) {
  if (const char* f = detail::getenv_nonempty("DISTILX_NCCL_ID_FILE")) return f;
  DISTILX_REQUIRE(config_error, !e.job_key.empty(), e.describe(),
                  ": cannot exchange the NCCL unique id: set DISTILX_NCCL_ID_FILE to a fresh path on a file system "
                  "every rank sees (or DISTILX_RUN_ID to a string unique to this run), or build with MPI "
                  "(DISTILX_NCCL_WITH_MPI) and launch with mpirun");
  std::string key = e.job_key;
  for (char& c : key)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_')) c = '_';
  std::string dir;
  if (const char* d = detail::getenv_nonempty("DISTILX_NCCL_ID_DIR")) dir = d;
  else if (e.single_node()) dir = "/tmp";
  else if (const char* h = detail::getenv_nonempty("HOME")) dir = h;
  else dir = "/tmp";
  return dir + "/.distilx-nccl-id-" + key;
}

/// Rank 0's half of the rendezvous: writes `bytes` to `path` atomically (temporary file, fsync,
/// rename), so a reader sees either no file or the whole id. The first line is a header with the
/// world size, which readers check.
inline void publish_rendezvous(const std::string& path, const std::string& bytes, int world_size) {
  std::string content = detail::concat("distilx-nccl-id v1 world ", world_size, "\n");
  content += bytes;
  data::detail::write_file_atomic(path, content, "NCCL id rendezvous");
}

/// The other ranks' half: waits (polling) up to timeout_s for `path` and returns its `size`
/// payload bytes. Throws io_error naming the rank on timeout, on a truncated file or when the file
/// was written for another world size (a stale file of an earlier run).
inline std::string await_rendezvous(const std::string& path, std::size_t size, int rank, int world_size,
                                    double timeout_s) {
  using ::distilx::detail::concat;
  const auto t0 = std::chrono::steady_clock::now();
  auto sleep = std::chrono::milliseconds(1);
  for (;;) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      std::string header;
      std::getline(in, header);
      std::string payload((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const std::string expect = concat("distilx-nccl-id v1 world ", world_size);
      DISTILX_REQUIRE(io_error, header == expect, "rank ", rank, ": NCCL id file '", path, "' starts with '", header,
                      "', expected '", expect, "' (a stale file of another run? use a fresh DISTILX_NCCL_ID_FILE)");
      DISTILX_REQUIRE(io_error, payload.size() == size, "rank ", rank, ": NCCL id file '", path, "' holds ",
                      payload.size(), " bytes, expected ", size);
      return payload;
    }
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    DISTILX_REQUIRE(io_error, waited < timeout_s, "rank ", rank, " of ", world_size, ": rank 0 did not publish the NCCL ",
                    "unique id in '", path, "' within ", timeout_s, " s (did rank 0 start? is the path on a file ",
                    "system every rank sees? raise DISTILX_NCCL_TIMEOUT if start-up is slow)");
    std::this_thread::sleep_for(sleep);
    if (sleep < std::chrono::milliseconds(100)) sleep *= 2;
  }
}

namespace detail {
/// A positive number of seconds from the environment variable `name`, or `fallback` when unset.
inline double env_seconds(const char* name, double fallback) {
  const char* v = getenv_nonempty(name);
  if (!v) return fallback;
  char* end = nullptr;
  const double t = std::strtod(v, &end);
  DISTILX_REQUIRE(config_error, end != v && *end == '\0' && t > 0, name, "='", v,
                  "' is not a positive number of seconds");
  return t;
}
}  // namespace detail

/// Seconds every blocking NCCL wait may take before the communicator is aborted:
/// DISTILX_NCCL_TIMEOUT (default 600), also used for the rendezvous.
inline double nccl_timeout_s() { return detail::env_seconds("DISTILX_NCCL_TIMEOUT", 600.0); }

/// Seconds a rank may stay stuck after the watchdog aborted NCCL before the process is ended:
/// DISTILX_NCCL_ABORT_GRACE (default 30).
inline double nccl_abort_grace_s() { return detail::env_seconds("DISTILX_NCCL_ABORT_GRACE", 30.0); }

}  // namespace distilx::parallel
