// A fixed pool of threads for netshrink's native kernels: the caller plus n - 1 workers run one job per
// generation and meet at spin barriers inside it (llm/native/decode.cpp; the encoder and CNN kernels use OpenMP
// teams instead, since torch's own OpenMP threads run between their calls).
#pragma once
#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace netshrink {

// Threads that run one job each generation and meet at a sense-reversing spin barrier.
class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    for (int t = 1; t < n; ++t) workers_.emplace_back([this, t] { loop(t); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return n_; }
  template <class F>
  void run(F&& job) {  // job(tid) on every thread; returns when all have finished
    job_ = [&job](int t) { job(t); };
    gen_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      cv_.notify_all();
    }
    job_(0);
    barrier();
  }
  void barrier() {
    if (n_ == 1) return;
    int phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
    } else {
      // Spin, but yield now and then: with more threads than free cores, the thread being waited for may
      // need this core to arrive at all.
      for (unsigned spins = 1; phase_.load(std::memory_order_acquire) == phase; ++spins) {
        _mm_pause();
        if ((spins & 1023) == 0) std::this_thread::yield();
      }
    }
  }

 private:
  void loop(int t) {
    int seen = 0;  // the generation at construction: a job posted before this thread starts still runs
    for (;;) {
      int spins = 0;
      while (gen_.load() == seen && spins < 200000) {
        _mm_pause();
        ++spins;
      }
      if (gen_.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, [&] { return gen_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = gen_.load();
      if (stop_) return;
      job_(t);
      barrier();
    }
  }
  int n_;
  std::vector<std::thread> workers_;
  std::function<void(int)> job_;
  std::atomic<int> gen_{0}, sleepers_{0}, count_{0}, phase_{0};
  bool stop_ = false;
  std::mutex mutex_;
  std::condition_variable cv_;
};

}  // namespace netshrink
