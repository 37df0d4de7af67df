#include <iostream>

#include "lib/greet.h"

int main() {
  if (greet("test") != "hello test") {
    std::cerr << "greet gave the wrong answer" << std::endl;
    return 1;
  }
  std::cout << "rex-cc-test-passed" << std::endl;
  return 0;
}
