"""OpenAI batch jobs: the runner that any api replica may host (`runner`), one batch's run (`job`), its input
lines (`lines`) and the output and error files it ends with (`assemble`)."""
