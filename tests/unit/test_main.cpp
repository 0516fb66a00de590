// Boost.Test entry point for the single distilx_tests binary.
#define BOOST_TEST_MODULE distilx
#include <boost/test/unit_test.hpp>
