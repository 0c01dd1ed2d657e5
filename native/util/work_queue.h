// WorkQueue: a fixed set of worker threads draining one FIFO of tasks.
// Used by the engine (transfer chunks) and by host-device streams (one thread each,
// which is what makes a stream FIFO).
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace epd {

class WorkQueue {
 public:
  using Task = std::function<void()>;

  explicit WorkQueue(size_t threads) {
    if (threads == 0) threads = 1;
    workers_.reserve(threads);
    for (size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { Run(); });
  }

  ~WorkQueue() { Shutdown(); }

  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Returns false after Shutdown(): the task is not run.
  bool Push(Task task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return false;
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
    return true;
  }

  // Pushes several tasks with one lock and wakes as many workers as useful.
  bool PushAll(std::vector<Task>& tasks) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return false;
      for (auto& t : tasks) tasks_.push_back(std::move(t));
    }
    if (tasks.size() == 1) cv_.notify_one(); else cv_.notify_all();
    return true;
  }

  // Runs every queued task, then joins the threads. Idempotent.
  void Shutdown() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_ && workers_.empty()) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) {
      if (w.joinable()) w.join();
    }
    workers_.clear();
  }

  size_t size() const { return workers_.size(); }

 private:
  void Run() {
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
        if (tasks_.empty()) return;  // stopping and drained
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> tasks_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
};

}  // namespace epd
