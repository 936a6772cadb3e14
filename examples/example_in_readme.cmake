# ctest driver (cmake -P): fails when README no longer contains EXAMPLE verbatim.
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(FIND "${readme}" "${example}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "README.md does not show ${EXAMPLE} as it is: paste the file's current "
                      "text into the README's C++ example")
endif()
