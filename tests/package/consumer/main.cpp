// A user's own program against the installed package: build a small student,
// run forward + backward, print its parameter count.
#include <distilx/distilx.hpp>

#include <cstdio>
#include <vector>

int main() {
  distilx::StudentConfig c;
  c.vocab_size = 64;
  c.embedding_dim = 32;
  c.num_blocks = 2;
  c.slstm_at = {1};
  distilx::Student<float> s(c);
  s.init(1);
  std::vector<int> tokens{1, 2, 3, 4, 5, 6};
  s.forward(tokens.data(), 1, 6);
  std::vector<float> g(6 * 32, 1.0f);
  s.zero_grad();
  s.backward(g.data());
  std::printf("trainable=%lld\n", static_cast<long long>(s.layout().count()));
  return 0;
}
