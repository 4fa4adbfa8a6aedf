"Count the notebooks nbdev_test runs: those under nbs/ not starting with _ or ., and not marked skip_exec."
import json
from pathlib import Path

def runs(p):
    if any(part.startswith(('_', '.')) for part in p.relative_to('nbs').parts): return False
    cells = json.loads(p.read_text())['cells']
    head = ''.join(cells[0]['source']) if cells else ''
    return 'skip_exec: true' not in head

print(sum(runs(p) for p in Path('nbs').rglob('*.ipynb')))
