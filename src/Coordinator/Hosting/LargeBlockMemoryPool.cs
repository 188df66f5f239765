using System.Buffers;
using System.Collections.Concurrent;
using Microsoft.AspNetCore.Connections;

namespace DistDiffusion.Coordinator.Hosting;

/// <summary>
/// Kestrel's connection buffers in blocks of <see cref="BlockBytes"/> instead of its default 4 KiB: the socket
/// transport receives into the free tail of the current block, so 4 KiB blocks meant one receive call (plus a
/// readiness probe) and one trip through the connection's pipe per 4 KiB of gradient; larger blocks move a
/// megabyte gradient in a few dozen receives.
/// </summary>
internal sealed class LargeBlockMemoryPoolFactory : IMemoryPoolFactory<byte>
{
    public LargeBlockMemoryPoolFactory(int blockBytes) => BlockBytes = blockBytes;
    public int BlockBytes { get; }
    public MemoryPool<byte> Create(MemoryPoolOptions? options = null) => new LargeBlockMemoryPool(BlockBytes);
}

/// <summary>Fixed-size pinned blocks (the socket layer pins receive buffers); at most <see cref="MaxIdle"/> idle blocks are kept.</summary>
internal sealed class LargeBlockMemoryPool : MemoryPool<byte>
{
    public const int DefaultBlockBytes = 64 << 10;
    /// <summary>Idle blocks kept (16 MiB of 64 KiB blocks): enough for the buffers of a few dozen busy connections.</summary>
    public const int MaxIdle = 256;
    private readonly ConcurrentQueue<byte[]> _idle = new();
    private readonly int _blockBytes;
    private bool _disposed;

    public LargeBlockMemoryPool(int blockBytes) => _blockBytes = blockBytes;

    public override int MaxBufferSize => _blockBytes;

    public override IMemoryOwner<byte> Rent(int minBufferSize = -1)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (minBufferSize > _blockBytes)
            throw new ArgumentOutOfRangeException(nameof(minBufferSize), minBufferSize, $"at most {_blockBytes} bytes per block");
        if (!_idle.TryDequeue(out var block)) block = GC.AllocateUninitializedArray<byte>(_blockBytes, pinned: true);
        return new Block(this, block);
    }

    private void Return(byte[] block)
    {
        if (!_disposed && _idle.Count < MaxIdle) _idle.Enqueue(block);
    }

    protected override void Dispose(bool disposing)
    {
        _disposed = true;
        _idle.Clear();
    }

    private sealed class Block : IMemoryOwner<byte>
    {
        private readonly LargeBlockMemoryPool _pool;
        private byte[]? _array;

        public Block(LargeBlockMemoryPool pool, byte[] array)
        {
            _pool = pool;
            _array = array;
        }

        public Memory<byte> Memory => _array ?? throw new ObjectDisposedException(nameof(Block));

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _array, null) is { } array) _pool.Return(array);
        }
    }
}
