set -e
mkdir -p /tmp/pk && python3 -m pip install -q --no-index --no-deps --target /tmp/pk .whl-demo/*.whl
export PYTHONPATH=/tmp/pk:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
P="python3 dev/pretrain_demo_model.py train --family sdxl --tokenizer-dir build/tokenizer --batch 512 --unet-seconds 240 --samples 60"
$P --out /tmp/a --warm-start --lr 4e-4 --seed 1 > /tmp/a.log 2>&1 &
$P --out /tmp/b --init-from build/sdxl-run0 --lr 3e-4 --seed 1 > /tmp/b.log 2>&1 &
wait
for r in a b; do mkdir -p $OUT/$r; cp /tmp/$r/unet.safetensors /tmp/$r/text_encoder_2.safetensors /tmp/$r/report.json $OUT/$r/ || true; echo "== $r"; tail -c 1200 /tmp/$r.log; done
best=$(python3 -c "
import json
def score(r):
    acc = json.load(open(f'/tmp/{r}/report.json'))['accuracy']
    return sum(v['all'] for v in acc.values())
print(max('ab', key=score))")
echo "demo on $best"
python3 dev/pretrain_demo_model.py export /tmp/$best /tmp/model > /dev/null
timeout 210 python3 -m dreambooth.demo.run /tmp/demo --checkpoint /tmp/model/shapes-sdxl.safetensors --config-dir /tmp/model/config --tokenizer-dir build/tokenizer --set 'device="cuda"' --json > $OUT/demo-$best.log 2>&1 || echo "demo rc $?"
tail -c 1500 $OUT/demo-$best.log
cp /tmp/demo/demo_grid.png $OUT/ 2>/dev/null || true
