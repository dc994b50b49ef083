// Linked into the test programs with --pre-js: under Node, hand the
// process's environment to the program (Emscripten gives it a fixed one
// of its own), so that KEEL_STRESS, KEEL_SEED and the like reach getenv().
// ENV exists only in programs that read the environment.
if (typeof process === 'object' && process.env) {
  Module['preRun'] = Module['preRun'] || [];
  Module['preRun'].push(function () {
    if (typeof ENV !== 'object')
      return;
    for (var k in process.env)
      ENV[k] = process.env[k];
  });
}
