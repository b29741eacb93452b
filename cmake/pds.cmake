# Helpers shared by every CMakeLists.txt in the tree.
#
#   pds_module(NAME SOURCES a.c b.c DEPS pds_base PkgConfig::X)
#       static library pds_NAME, include root common/, our warnings, linked into libpdserve.
#   pds_program(NAME SOURCES main.c DEPS ...)
#   pds_test(NAME SOURCES t.c DEPS ...)   Criterion binary test_NAME, registered with ctest.

set(PDS_WARNINGS -Wall -Wextra -Werror -Wno-unused-parameter -Wshadow -Wstrict-prototypes
    -Wmissing-prototypes -Wno-missing-field-initializers)
set(PDS_SAN_FLAGS -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
set_property(GLOBAL PROPERTY PDS_MODULES "")

function(pds_apply_flags tgt)
  get_target_property(type ${tgt} TYPE)
  target_compile_options(${tgt} PRIVATE $<$<COMPILE_LANGUAGE:C>:${PDS_WARNINGS}>)
  target_compile_definitions(${tgt} PRIVATE _GNU_SOURCE)
  if(PDS_SANITIZE)
    target_compile_options(${tgt} PRIVATE $<$<COMPILE_LANGUAGE:C>:${PDS_SAN_FLAGS}>)
    target_link_options(${tgt} PUBLIC ${PDS_SAN_FLAGS})
  endif()
endfunction()

function(pds_module name)
  cmake_parse_arguments(M "" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(pds_${name} STATIC ${M_SOURCES})
  target_include_directories(pds_${name} PUBLIC ${PROJECT_SOURCE_DIR}/common)
  target_link_libraries(pds_${name} PUBLIC ${M_DEPS} PRIVATE ${M_PRIVATE_DEPS})
  set_target_properties(pds_${name} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  pds_apply_flags(pds_${name})
  set_property(GLOBAL APPEND PROPERTY PDS_MODULES pds_${name})
endfunction()

function(pds_program name)
  cmake_parse_arguments(M "" "" "SOURCES;DEPS" ${ARGN})
  add_executable(${name} ${M_SOURCES})
  target_link_libraries(${name} PRIVATE ${M_DEPS})
  pds_apply_flags(${name})
  install(TARGETS ${name} RUNTIME DESTINATION bin)
endfunction()

function(pds_test name)
  if(NOT PDS_TESTS)
    return()
  endif()
  cmake_parse_arguments(M "" "" "SOURCES;DEPS" ${ARGN})
  add_executable(test_${name} ${M_SOURCES})
  target_link_libraries(test_${name} PRIVATE ${M_DEPS} PkgConfig::CRITERION)
  target_include_directories(test_${name} PRIVATE ${PROJECT_SOURCE_DIR}/tests)
  pds_apply_flags(test_${name})
  add_test(NAME ${name} COMMAND test_${name} --jobs 1)
  set_tests_properties(${name} PROPERTIES TIMEOUT 900 LABELS unit
    ENVIRONMENT "PDS_TEST_TMP=${CMAKE_BINARY_DIR}/testtmp;PDS_BUILD_DIR=${CMAKE_BINARY_DIR};PDS_SOURCE_DIR=${PROJECT_SOURCE_DIR}")
endfunction()
