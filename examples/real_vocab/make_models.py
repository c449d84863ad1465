"""Write the example's random-weight Qwen3-layout teacher and student into models/ (offline,
with mlx-lm's own model classes; about 1 GB). Already there: left as they are."""

from pathlib import Path

from kdcore.models.mlxlm import create_mlxlm_dir

HERE = Path(__file__).resolve().parent
VOCAB = 151_936


def qwen3(hidden: int, layers: int = 2) -> dict:
    heads = hidden // 128
    return dict(
        model_type="qwen3",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=3 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=128,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    )


if __name__ == "__main__":
    for name, hidden, seed in (("teacher", 1024, 1), ("student", 512, 2)):
        path = HERE / "models" / name
        if not (path / "model.safetensors").exists():
            create_mlxlm_dir(path, qwen3(hidden), seed=seed)
        print(f"{name}: {path}")
