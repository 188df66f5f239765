# Sourced by the scripts that train into a run folder (demo.sh, mnist-quality.sh).
# fresh_run_folder NAME DIR: refuse a non-empty DIR that holds no earlier run (no recipe.json), else empty it
# (an earlier run there is replaced) so that `coordinator run --out DIR` starts from step 0.
fresh_run_folder() {
  local name="$1" dir="$2"
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ ! -f "$dir/recipe.json" ]; then
    echo "$name: $dir is not empty and holds no earlier run (no recipe.json): choose another folder" >&2
    exit 2
  fi
  rm -rf "$dir"
}
