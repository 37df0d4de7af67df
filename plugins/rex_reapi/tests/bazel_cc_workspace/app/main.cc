#include <iostream>

#include "lib/greet.h"

int main() {
  std::cout << greet("rex") << std::endl;
  return 0;
}
