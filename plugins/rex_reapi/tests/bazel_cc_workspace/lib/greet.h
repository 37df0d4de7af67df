#ifndef REX_TEST_GREET_H_
#define REX_TEST_GREET_H_

#include <string>

std::string greet(const std::string& who);

#endif
