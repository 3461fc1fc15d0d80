"""Learn the embedded model's BPE tokenizer from every caption the recipe can write.

    python make_tokenizer.py emoji.npz OUT_DIR [SCENES_DIR]      # SCENES_DIR: scenes.py's captions too
"""

import sys
from pathlib import Path

from emoji_data import BG_NAMES, caption, load, train_tokenizer

if __name__ == "__main__":
    d = load(Path(sys.argv[1]))
    texts = [caption(n, s, b) for n, s in zip(d["name"], d["style"]) for b in BG_NAMES]
    texts += [k for k in d["keywords"] if k] + ["a cat face", "a photo of a dog", "red apple on a table"]
    if len(sys.argv) > 3:
        texts += [p.read_text() for p in sorted(Path(sys.argv[3]).glob("*.txt"))]
    tok = train_tokenizer(texts, Path(sys.argv[2]))
    print(f"tokenizer: {len(tok)} tokens")
